import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import mlflow
import pytest
import torch
import yaml

from paramshare import config, tracking
from paramshare.config import Config
from paramshare.errors import TrackingError
from paramshare.metrics import unique_param_count
from paramshare.models import build

from .conftest import ROOT, interrupt_in_epoch_2, resumed_after


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test")
    return tmp_path


def test_repo_root_is_lifted_out_of_a_dvc_experiment_copy(tmp_path):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    copy.mkdir(parents=True)
    assert tracking.repo_root(copy) == tmp_path / "repo"
    (tmp_path / "plain" / ".dvc").mkdir(parents=True)
    (tmp_path / "plain" / "src").mkdir()
    assert tracking.repo_root(tmp_path / "plain" / "src") == tmp_path / "plain"


def test_embedded_store_lives_at_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc" / "tmp" / "exps" / "x"))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_run_records_params_tags_and_a_model_that_keeps_its_tie(store):
    cfg = Config()
    model = build("recurrent", True, {"hidden": 8})
    example = torch.rand(2, 1, 28, 28)
    with tracking.training_run("recurrent", cfg, "digest123") as run:
        run.log_epoch({"epoch": 1, "train_loss": 0.5, "val_acc": 0.9})
        run.log_model(model, example)
    client = mlflow.tracking.MlflowClient()
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "recurrent/tied/n=55000/seed=0"
    assert logged.data.params["model.recurrent.hidden"] == "128"
    assert logged.data.params["family"] == "recurrent"
    assert logged.data.tags["data_digest"] == "digest123" and logged.data.tags["tied"] == "true"
    assert logged.data.tags["project"] == "paramshare"
    logged_params = yaml.safe_load(mlflow.artifacts.load_text(f"{logged.info.artifact_uri}/params.yaml"))
    assert config.from_dict(logged_params) == cfg
    parent = client.get_run(logged.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["run_role"] == "parent" and parent.info.status == "FINISHED"
    with tracking.training_run("mlp", cfg, "digest123") as twin:
        pass
    assert client.get_run(twin.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    loaded = tracking.load_model(run.run_id)
    assert loaded.cells[0] is loaded.cells[27]
    assert unique_param_count(loaded) == unique_param_count(model)
    torch.testing.assert_close(loaded(example), model(example))
    assert tracking.log_to_run(run.run_id, {"test_acc": 0.5})
    assert client.get_run(run.run_id).data.metrics["test_acc"] == 0.5


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_dies_is_marked(store, error, status):
    with pytest.raises(type(error)):
        with tracking.training_run("mlp", Config(), "d") as run:
            raise error
    assert mlflow.tracking.MlflowClient().get_run(run.run_id).info.status == status


def test_logging_to_a_missing_run_says_so(store):
    assert tracking.log_to_run("0" * 32, {"x": 1.0}) is False


@pytest.fixture
def workspace(small_prepared, tmp_path):
    """A directory holding prepared data, as the prepare stage leaves it."""
    small_prepared.save(tmp_path / "data/prepared/mnist.pt")
    (tmp_path / "data/prepared/meta.json").write_text(json.dumps({"digest": small_prepared.digest()}))
    return tmp_path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_fast_naming_the_uri(monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable"):
        tracking.setup()
    assert time.perf_counter() - t0 < tracking.PROBE_TIMEOUT_S + 5


def test_the_train_stage_refuses_an_unreachable_server_before_training(workspace):
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "stages/train.py"), "mlp", "--params", str(ROOT / "params.yaml")],
                          cwd=workspace, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: MLflow tracking server {uri} is unreachable ([Errno 111] Connection refused); "
        "start it, or unset MLFLOW_TRACKING_URI to use the embedded store"]
    assert "epoch" not in proc.stdout
    assert not (workspace / "models").exists() and not (workspace / "metrics").exists()


WRITER = """
import dataclasses
import sys
from paramshare import config, tracking
from paramshare.config import Config
cfg = dataclasses.replace(Config(), seed=int(sys.argv[1]))
with tracking.training_run("mlp", cfg, "digest") as run:
    for step in range(1, 31):
        run.log_epoch({"epoch": step, "value": step * 1.0})
"""


def test_four_processes_share_one_fresh_sqlite_store(tmp_path):
    """Four training runs start at once on a store that does not exist yet: one schema,
    one experiment, one parent run, four children with every metric."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "concurrent",
           "PYTHONPATH": str(ROOT / "src"), "DVC_EXP_BASELINE_REV": "b" * 40}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_role") == "parent"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("study@bbbbbbbb")
    assert sorted(r.info.run_name for r in children) == [f"mlp/tied/n=55000/seed={i}" for i in range(4)]
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert [m.step for m in client.get_metric_history(r.info.run_id, "value")] == list(range(1, 31))


def test_a_terminated_train_stage_marks_its_run_killed_and_leaves_no_metrics(workspace):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["epochs"] = 500
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "killed",
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages/train.py"), "mlp"], cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and "epoch 2/" not in (line := proc.stdout.readline()):
        pass
    assert line.startswith("epoch 2/"), proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("run_role") != "parent"] == ["KILLED"]
    assert not (workspace / "metrics").exists()
    assert not (workspace / "models").exists() or not any((workspace / "models").rglob("*.tmp"))


def _stage_env(workspace, experiment):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
            "MLFLOW_EXPERIMENT_NAME": experiment, "PYTHONPATH": str(ROOT / "src")}


def test_an_interrupted_train_stage_resumes_to_the_result_of_an_uninterrupted_one(workspace, tmp_path):
    """SIGTERM after epoch 2 of 30, then the same stage again: it continues after the last
    checkpointed epoch and ends with the same weights and metrics as a run never stopped."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["epochs"] = 30
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    reference = tmp_path / "reference"
    shutil.copytree(workspace / "data", reference / "data")
    (reference / "params.yaml").write_text(yaml.safe_dump(params))
    stage = [sys.executable, str(ROOT / "stages/train.py"), "mlp"]
    subprocess.run(stage, cwd=reference, env=_stage_env(reference, "resume"), check=True, capture_output=True)

    env = _stage_env(workspace, "resume")
    returncode, err = interrupt_in_epoch_2(stage, workspace, env, timeout=60)
    assert returncode == 130, err[-2000:]
    assert not (workspace / "metrics").exists()
    assert len(list((workspace / "checkpoints").glob("mlp-*.pt"))) == 1

    resumed = subprocess.run(stage, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = resumed_after(resumed.stdout)
    assert 1 <= after < 30
    trained = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("epoch ")]
    assert trained == [f"{e}/30" for e in range(after + 1, 31)]
    assert not list((workspace / "checkpoints").iterdir())

    def load(root):
        return torch.load(root / "models/mlp/model.pt", weights_only=True)["state_dict"]

    for name, tensor in load(reference).items():
        assert torch.equal(tensor, load(workspace)[name]), name
    mine = json.loads((workspace / "plots/history/mlp.json").read_text())
    theirs = json.loads((reference / "plots/history/mlp.json").read_text())
    timing = ("epoch_seconds", "images_per_s")
    assert [{k: v for k, v in e.items() if k not in timing} for e in mine] == \
        [{k: v for k, v in e.items() if k not in timing} for e in theirs]
    client = mlflow.tracking.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id],
                              order_by=["attributes.start_time ASC"])
    killed, finished = [r for r in runs if r.data.tags.get("run_role") != "parent"]
    assert killed.info.status == "KILLED" and finished.info.status == "FINISHED"
    assert finished.data.tags["resumed_after_epoch"] == str(after)
    assert finished.data.tags["resumes_run"] == killed.info.run_id
    assert "superseded_by" not in killed.data.tags
    assert [m.step for m in client.get_metric_history(finished.info.run_id, "val_acc")] == list(range(1, 31))


def test_a_checkpoint_of_other_params_is_not_resumed(workspace):
    from paramshare.training import checkpoint_key
    cfg = config.Config()
    assert checkpoint_key(cfg, "mlp", "d") == checkpoint_key(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=1, resume=False)), "mlp", "d")
    assert checkpoint_key(cfg, "mlp", "d") != checkpoint_key(cfg, "mlp", "other-data")
    assert checkpoint_key(cfg, "mlp", "d") != checkpoint_key(cfg, "conv", "d")
    assert checkpoint_key(cfg, "mlp", "d") != checkpoint_key(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.01)), "mlp", "d")
