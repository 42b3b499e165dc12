"""A DVC remote, full round trip: push from one clone, pull into a fresh one, nothing to rebuild."""
import subprocess
from pathlib import Path

import pytest

from .test_pipeline import env_for, mlflow_runs, run, tiny_repo

pytestmark = pytest.mark.usefixtures("mirror")

PUSHED = ("data/raw", "data/prepared", "models/conv", "models/mlp")


def files_under(root: Path, outs=PUSHED) -> dict[str, bytes]:
    found = {str(p.relative_to(root)): p.read_bytes() for out in outs for p in (root / out).rglob("*") if p.is_file()}
    assert all(any(name.startswith(out + "/") for name in found) for out in outs), sorted(found)
    return found


def test_push_to_a_directory_remote_then_a_fresh_clone_pulls_everything_and_rebuilds_nothing(tmp_path, mirror):
    repo = tiny_repo(tmp_path, variants=["conv", "mlp"])
    env = env_for(repo, mirror)
    store = tmp_path / "store"
    run(["dvc", "remote", "add", "-d", "store", str(store)], repo, env)
    run(["git", "commit", "-qm", "default remote", "--", ".dvc/config"], repo, env)
    run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    assert "files pushed" in run(["dvc", "push"], repo, env)
    _, trained = mlflow_runs(repo)
    assert len(trained) == 2

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "models").exists() and not (clone / "data").exists()
    run(["dvc", "pull"], clone, env)

    assert files_under(clone) == files_under(repo)
    assert run(["dvc", "status"], clone, env).strip() == "Data and pipelines are up to date."
    assert "in sync" in run(["dvc", "status", "--cloud"], clone, env)

    out = run(["dvc", "repro"], clone, env)
    assert "Running stage" not in out and out.count("didn't change, skipping") == 7, out
    assert "Data and pipelines are up to date." in out
    assert not (clone / "mlflow.db").exists() and not (clone / "mlartifacts").exists()
    assert run(["git", "status", "--porcelain"], clone, env) == ""
    assert files_under(clone) == files_under(repo)


def test_pull_from_a_missing_or_empty_remote_fails_naming_what_is_missing(tmp_path, mirror):
    repo = tiny_repo(tmp_path, variants=["mlp"])
    env = env_for(repo, mirror)
    store = tmp_path / "store"
    run(["dvc", "remote", "add", "-d", "store", str(store)], repo, env)
    run(["dvc", "repro", "train@mlp"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "trained, never pushed"], repo, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)

    for remote in ("missing", "empty"):
        if remote == "empty":
            store.mkdir()
        proc = subprocess.run(["dvc", "pull"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, (remote, out)
        assert "ERROR: failed to pull data from the cloud - Checkout failed for following targets:" in out
        assert "Some of the cache files do not exist neither locally nor on remote" in out
        assert all(target in out.splitlines() for target in ("data/raw", "data/prepared", "models/mlp")), out
        assert not (clone / "models" / "mlp").exists()
