"""End to end: a tiny `dvc repro` and `dvc exp run` in a temporary git clone."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("mirror")


def tiny_repo(tmp_path: Path, **overrides) -> Path:
    """A git repository holding this checkout's tracked and unignored files, on tiny params."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"] = {"val_size": 500, "train_size": 300}
    params["train"].update(epochs=1, batch_size=50)
    params["variants"] = ["conv", "soft"]
    params["model"]["soft"]["hidden"] = 32
    for key, value in overrides.items():
        node = params
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["config", "user.name", "paramshare tests"],
                 ["config", "user.email", "tests@paramshare.invalid"], ["add", "-A"],
                 ["commit", "-qm", "tiny study"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    return repo


def env_for(repo: Path, mirror: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["PARAMSHARE_MNIST_MIRROR"] = str(mirror)
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def run(cmd, repo, env, timeout=900):
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def mlflow_runs(repo: Path, role: str = "model"):
    """The model runs (or, role="parent", the parent runs) of the repo's embedded store."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("paramshare")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, [r for r in runs if (r.data.tags.get("run_role") == "parent") == (role == "parent")]


def test_tiny_study_repro_tracks_every_model_and_exp_run_trains_the_untied_twin(tmp_path, mirror):
    import mlflow.pytorch
    import torch

    from paramshare.data import Prepared, normalise
    from paramshare.metrics import evaluate_split, unique_param_count

    repo = tiny_repo(tmp_path)
    env = env_for(repo, mirror)
    run(["dvc", "repro"], repo, env)

    for family in ("conv", "soft"):
        assert json.loads((repo / f"metrics/eval/{family}.json").read_text())["tied"] is True
    assert "| conv |" in (repo / "reports/compare.md").read_text()
    assert (repo / "reports/compare.png").read_bytes()[:4] == b"\x89PNG"
    digest = json.loads((repo / "data/prepared/meta.json").read_text())["digest"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

    client, runs = mlflow_runs(repo)
    assert [r.data.tags["family"] for r in runs] == ["conv", "soft"]
    conv = runs[0]
    assert conv.info.status == "FINISHED"
    assert conv.info.run_name == "conv/tied/n=300/seed=0"
    assert conv.data.params["train.epochs"] == "1" and conv.data.params["model.tied"] == "True"
    assert conv.data.params["data.train_size"] == "300"
    assert conv.data.tags["tied"] == "true" and conv.data.tags["git_commit"] == head
    assert conv.data.tags["data_digest"] == digest
    assert [m.step for m in client.get_metric_history(conv.info.run_id, "val_acc")] == [1]
    evaluated = json.loads((repo / "metrics/eval/conv.json").read_text())
    assert conv.data.metrics["test_acc"] == pytest.approx(evaluated["test_acc"])
    assert conv.data.metrics["unique_params"] == 211_690

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{conv.info.run_id}/model")
    data = Prepared.load(repo / "data/prepared/mnist.pt")
    assert unique_param_count(model) == 211_690
    reloaded = evaluate_split(model, normalise(data.test_images), data.test_labels)
    assert reloaded["acc"] == pytest.approx(evaluated["test_acc"], abs=1e-9)
    assert isinstance(model, torch.nn.Module)

    out = run(["dvc", "repro"], repo, env)
    assert "didn't change, skipping" in out or "up to date" in out
    assert len(mlflow_runs(repo)[1]) == 2

    run(["dvc", "exp", "run", "-S", "model.tied=false"], repo, env)
    _, runs = mlflow_runs(repo)
    untied = [r for r in runs if r.data.tags["tied"] == "false"]
    assert sorted(r.data.tags["family"] for r in untied) == ["conv", "soft"]
    assert all(r.data.tags.get("dvc_exp_name") for r in untied)
    _, parents = mlflow_runs(repo, "parent")
    assert [p.data.tags["study_key"] for p in parents] == [head]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    conv_untied = next(r for r in untied if r.data.tags["family"] == "conv")
    assert conv_untied.data.metrics["unique_params"] == 2_265_610
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    assert "model.tied" in json.dumps(shown) or "tied" in json.dumps(shown)

    out = run([sys.executable, "-m", "paramshare.cli", "diff", conv.info.run_id, conv_untied.info.run_id], repo, env)
    params = out.split("\n\n")[1].splitlines()
    assert params[0] == "params (1 differ)" and params[2].split() == ["model.tied", "True", "False"]

    out = run([sys.executable, "-m", "paramshare.cli", "reproduce", conv_untied.info.run_id], repo, env)
    assert "reproduced: all" in out and "DIFFERS" not in out, out
    client, runs = mlflow_runs(repo)
    again = next(r for r in runs if r.data.tags.get("reproduces") == conv_untied.info.run_id)
    assert again.data.params == {**conv_untied.data.params, "variants": "conv"}
    for key, value in conv_untied.data.metrics.items():
        if not key.endswith(("seconds", "images_per_s")):
            assert again.data.metrics[key] == value, key
    assert subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout.count("\n") == 1


def _queue_idle(repo: Path, env: dict) -> bool:
    status = run(["dvc", "queue", "status"], repo, env)
    return not any(word in status for word in ("Queued", "Running"))


@pytest.mark.slow
def test_a_two_by_two_sweep_through_the_dvc_queue_lands_in_one_store_and_reports(tmp_path, mirror):
    import time

    repo = tiny_repo(tmp_path, variants=["mlp"])
    env = env_for(repo, mirror)
    run(["dvc", "exp", "run", "--queue", "-S", "model.tied=true,false", "-S", "seed=0,1"], repo, env)
    run(["dvc", "queue", "start"], repo, env)
    deadline = time.monotonic() + 900
    while not _queue_idle(repo, env):
        assert time.monotonic() < deadline, run(["dvc", "queue", "status"], repo, env)
        time.sleep(5)
    assert "Failed" not in run(["dvc", "queue", "status"], repo, env)

    client, runs = mlflow_runs(repo)
    cells = sorted((r.data.tags["tied"], r.data.tags["seed"]) for r in runs)
    assert cells == [("false", "0"), ("false", "1"), ("true", "0"), ("true", "1")]
    assert all(r.info.status == "FINISHED" and "test_acc" in r.data.metrics for r in runs)
    assert len({r.data.tags["dvc_exp_name"] for r in runs}) == 4
    _, parents = mlflow_runs(repo, "parent")
    assert len(parents) == 1 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}

    run([sys.executable, "-m", "paramshare.cli", "report"], repo, env)
    text = (repo / "reports/study.md").read_text()
    accs = {(r.data.tags["tied"], r.data.tags["seed"]): 100 * r.data.metrics["test_acc"] for r in runs}
    tied_mean = (accs[("true", "0")] + accs[("true", "1")]) / 2
    assert f"{tied_mean:.2f}%" in text and "(2 seeds)" in text


def test_every_stage_imports_the_library_from_its_own_checkout():
    """Queued experiments run in copies of the repository; the editable install would make
    them import the main working tree's code instead of their own."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = [s.get("cmd") or s["do"]["cmd"] for s in stages.values()]
    assert commands and all(c.startswith("PYTHONPATH=src python stages/") for c in commands)
