"""`paramshare diff` and the refusals of `paramshare reproduce` (the bit-for-bit reproduction
itself is in test_pipeline, on a run the real pipeline made)."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from paramshare import runs, tracking
from paramshare.config import Config, TrainConfig

from .conftest import ROOT


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A committed git repository with a src/ file, an embedded store, and the cwd in it."""
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "code.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["config", "user.name", "t"], ["config", "user.email", "t@t.invalid"],
                 ["add", "-A"], ["commit", "-qm", "init"]):
        git(repo, *args)
    monkeypatch.chdir(repo)
    for key in [k for k in os.environ if k.startswith(("DVC_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    return repo


def train_run(cfg: Config, family: str = "mlp", metrics: dict | None = None) -> str:
    with tracking.training_run(family, cfg, "digest") as run:
        run.log_epoch({"epoch": 1, "val_acc": 0.5})
        run.log_metrics(metrics or {"test_acc": 0.9})
    return run.run_id


def paramshare(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "paramshare.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_diff_shows_exactly_the_changed_params_tags_and_metrics(repo):
    base = Config()
    a = train_run(base, metrics={"test_acc": 0.9, "unique_params": 100})
    b = train_run(dataclasses.replace(base, train=TrainConfig(lr=0.01)), metrics={"test_acc": 0.8,
                                                                                  "unique_params": 100})
    client = MlflowClient(tracking.tracking_uri())
    text = runs.diff_runs(client.get_run(a), client.get_run(b))
    sections = text.split("\n\n")
    params = sections[1].splitlines()
    assert params[0] == "params (1 differ)"
    assert params[2].split() == ["train.lr", "0.001", "0.01"]
    assert "mlflow.runName" not in sections[2]
    metrics = sections[3].splitlines()
    assert metrics[0] == "final metrics (1 differ)"
    assert metrics[2].split()[:3] == ["test_acc", "0.9", "0.8"]
    assert "unique_params" not in sections[3] and "val_acc" not in sections[3]


def test_diff_of_a_run_with_itself_is_identical(repo):
    a = train_run(Config())
    proc = paramshare("diff", a, a, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert "params: identical" in proc.stdout and "final metrics: identical" in proc.stdout


def test_unknown_and_foreign_runs_and_a_missing_store_are_one_line_errors(repo):
    proc = paramshare("diff", "0" * 32, "1" * 32, cwd=repo)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: MLflow store sqlite:///{repo / 'mlflow.db'} cannot be opened: no "
                                   f"database file at {repo / 'mlflow.db'}; run the pipeline first or set "
                                   "MLFLOW_TRACKING_URI")
    a = train_run(Config())
    proc = paramshare("reproduce", "0" * 32, cwd=repo)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: run {'0' * 32} not found in sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(a).data.tags["mlflow.parentRunId"]
    proc = paramshare("reproduce", parent, cwd=repo)
    assert proc.returncode == 1 and "was not made by paramshare" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    experiment = client.create_experiment("other-project")
    foreign = client.create_run(experiment, run_name="someone-else").info.run_id
    proc = paramshare("diff", a, foreign, cwd=repo)
    assert proc.returncode == 1 and f"run {foreign} (someone-else) was not made by paramshare" in proc.stderr


def test_a_store_that_is_not_a_database_is_refused(repo, monkeypatch):
    (repo / "junk.db").write_text("not sqlite")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'junk.db'}")
    proc = paramshare("diff", "a", "b", cwd=repo)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: MLflow store sqlite:///{repo / 'junk.db'} cannot be opened")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_reproduce_refuses_dirty_code_a_dirty_run_and_a_missing_commit(repo):
    clean = train_run(Config())
    (repo / "src" / "code.py").write_text("x = 2\n")
    dirty = train_run(Config())
    proc = paramshare("reproduce", clean, cwd=repo)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: working tree has uncommitted code changes (src/code.py); "
                                   "commit or stash them first")
    git(repo, "commit", "-qam", "change")
    proc = paramshare("reproduce", dirty, cwd=repo)
    assert proc.returncode == 1 and "trained from uncommitted code changes (git_dirty=true)" in proc.stderr
    client = MlflowClient(tracking.tracking_uri())
    client.set_tag(clean, "git_commit", "f" * 40)
    proc = paramshare("reproduce", clean, cwd=repo)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: commit {'f' * 12} of run {clean} is not in {repo}; fetch it first "
                                   f"(git fetch origin {'f' * 40})")


def test_params_of_a_run_without_the_params_artifact_are_rebuilt_from_the_flat_params(repo):
    from mlflow.entities import Param

    from paramshare.config import flatten, from_dict

    cfg = dataclasses.replace(Config(), seed=3, variants=("conv", "mlp"))
    client = MlflowClient(tracking.tracking_uri())
    experiment = client.create_experiment("old-runs")
    old = client.create_run(experiment, run_name="conv/tied/n=55000/seed=3")
    params = {"family": "conv", **flatten(cfg.to_dict())}
    client.log_batch(old.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    assert from_dict(runs.recorded_params(client, client.get_run(old.info.run_id))) == cfg
