"""Two DVC queue workers at once: every experiment, run and epoch lands in the one store."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .test_pipeline import env_for, mlflow_runs, run, tiny_repo

pytestmark = pytest.mark.usefixtures("mirror")

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s")


def queue_workers(repo: Path) -> list[int]:
    """Pids of the `dvc exp queue-worker` processes working for this repository."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(proc / "cwd"))
        except (OSError, ValueError):
            continue
        if b"queue-worker" in args and cwd.is_relative_to(repo):
            pids.append(int(proc.name))
    return pids


def queue_states(repo: Path, env: dict) -> list[str]:
    lines = run(["dvc", "queue", "status"], repo, env).splitlines()
    return [line.split()[-1] for line in lines[1:] if line.strip() and not line.startswith("Worker status")]


def stop_workers(repo: Path, env: dict, grace: float = 30) -> list[int]:
    """Wait for this repository's workers to exit (an idle worker leaves within ~10 s); stop the
    rest. Returns the pids that were still there after the grace period."""
    deadline = time.monotonic() + grace
    while queue_workers(repo) and time.monotonic() < deadline:
        time.sleep(1)
    left = queue_workers(repo)
    if left:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=60)
        time.sleep(5)
        for pid in queue_workers(repo):
            os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.slow
def test_two_queue_workers_run_four_experiments_at_once_and_every_run_and_epoch_lands(tmp_path, mirror):
    repo = tiny_repo(tmp_path, variants=["conv", "mlp"], **{"train.epochs": 2})
    env = env_for(repo, mirror)
    run(["dvc", "exp", "run", "--queue", "-S", "seed=0,1,2,3"], repo, env)
    # The workers inherit the starter's stdout: with captured pipes, the call would return only when they exit.
    with open(tmp_path / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=120, check=True)
    try:
        most_running, most_workers, deadline = 0, 0, time.monotonic() + 1200
        while {"Queued", "Running"} & set(states := queue_states(repo, env)):
            most_running = max(most_running, states.count("Running"))
            most_workers = max(most_workers, len(queue_workers(repo)))
            assert time.monotonic() < deadline, states
            time.sleep(2)
        assert states == ["Success"] * 4, run(["dvc", "queue", "status"], repo, env)
        assert most_running == 2 and most_workers == 2
    finally:
        lingering = stop_workers(repo, env)
    assert lingering == [], "queue workers still running 30 s after the queue drained"

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    exps = [rev for base in shown for exp in base.get("experiments") or [] for rev in exp["revs"]]
    assert len(exps) == 4 and all(rev.get("error") is None for rev in exps), exps
    assert sorted(rev["data"]["params"]["params.yaml"]["data"]["seed"] for rev in exps) == [0, 1, 2, 3]

    client, runs = mlflow_runs(repo)
    assert sorted((r.data.tags["dvc_exp_name"], r.data.tags["family"]) for r in runs) == sorted(
        (rev["name"], family) for rev in exps for family in ("conv", "mlp"))
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "0", "1", "1", "2", "2", "3", "3"]
    for r in runs:
        assert r.info.status == "FINISHED" and "test_acc" in r.data.metrics, r.info.run_name
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2], (r.info.run_name, key)
    _, parents = mlflow_runs(repo, "parent")
    assert len(parents) == 1 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}

    spans = [(r.info.start_time, r.info.end_time, r.data.tags["dvc_exp_name"]) for r in runs]
    assert any(a[2] != b[2] and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans), spans
