"""Nothing runs code from a params file or a loaded file; a diverging stage fails cleanly."""
import json
import os
import re
import subprocess
import sys

import mlflow
import pytest
import torch
import yaml

from paramshare import config
from paramshare.training import checkpoint_key

from .conftest import ROOT


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def workspace(small_prepared, tmp_path):
    small_prepared.save(tmp_path / "data/prepared/mnist.pt")
    (tmp_path / "data/prepared/meta.json").write_text(json.dumps({"digest": small_prepared.digest()}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    params["model"]["mlp"]["hidden"] = 16
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def ours(stderr: str) -> list[str]:
    """stderr without MLflow's own timestamped INFO lines (creating a fresh store logs two)."""
    return [line for line in stderr.strip().splitlines() if not re.match(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", line)]


def stage(name, workspace, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=300)


def model_runs(workspace):
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("paramshare").experiment_id])
    return [r for r in runs if r.data.tags.get("run_role") != "parent"]


def test_a_params_file_that_would_build_python_objects_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "params.yaml"
    bad.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(config.ConfigError, match=r"params.yaml: refused at line 1: could not determine a "
                                                 r"constructor for the tag 'tag:yaml.org,2002:python/object/apply"):
        config.load(bad)
    proc = stage("train", tmp_path, "mlp")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: params: params.yaml: refused at line 1")
    assert not marker.exists()


def test_a_model_file_that_would_run_code_is_refused_by_evaluate(workspace):
    marker = workspace / "ran"
    (workspace / "models/mlp").mkdir(parents=True)
    torch.save({"family": "mlp", "tied": True, "hparams": {"hidden": 16}, "state_dict": RunsCode(marker)},
               workspace / "models/mlp/model.pt")
    proc = stage("evaluate", workspace, "mlp")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert ours(proc.stderr) == ["error: refused to load a model or checkpoint that is not plain tensors "
                                 "(weights_only=True): Trying to load unsupported GLOBAL posix.system whose "
                                 "module posix is blocked."]
    assert not marker.exists()
    assert not (workspace / "metrics").exists()


def test_a_checkpoint_that_would_run_code_is_refused_and_the_run_marked_failed(workspace):
    marker = workspace / "ran"
    cfg = config.load(workspace / "params.yaml")
    digest = json.loads((workspace / "data/prepared/meta.json").read_text())["digest"]
    path = workspace / "checkpoints" / f"mlp-{checkpoint_key(cfg, 'mlp', digest)}.pt"
    path.parent.mkdir()
    torch.save({"epoch": 1, "model": RunsCode(marker)}, path)
    proc = stage("train", workspace, "mlp")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(ours(proc.stderr)) == 1
    assert ours(proc.stderr)[0].startswith("error: refused to load a model or checkpoint that is not plain tensors")
    assert "GLOBAL posix.system" in proc.stderr
    assert not marker.exists()
    assert [r.info.status for r in model_runs(workspace)] == ["FAILED"]
    assert not (workspace / "metrics").exists() and not (workspace / "models").exists()


def test_a_diverging_train_stage_fails_naming_epoch_and_batch_and_marks_its_run_failed(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["train"]["lr"] = 1e30
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    proc = stage("train", workspace, "mlp")
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = ours(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: loss is ") and " at epoch 1, batch " in lines[0]
    assert lines[0].endswith("; lower train.lr (now 1e+30)")
    assert [r.info.status for r in model_runs(workspace)] == ["FAILED"]
    assert not (workspace / "metrics").exists() and not (workspace / "models").exists()
