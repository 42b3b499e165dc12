"""Single MLflow runs: `paramshare diff RUN_A RUN_B` and `paramshare reproduce RUN_ID`.

Reproduce re-trains a run from what the run itself recorded: the git commit of its code
and its full params. It checks the commit out into a temporary git worktree (the user's
working tree is never touched), runs that commit's own stage scripts there (download,
prepare, train, evaluate: the recorded code, not today's), logs the new run to the same
store tagged `reproduces=<id>`, and compares every metric with the original's.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from paramshare import tracking
from paramshare.errors import TrackingError

TIMING_MARKERS = ("seconds", "images_per_s")
TAGS_NOT_COMPARED = ("mlflow.log-model.history",)


def get_run(client, run_id: str):
    """The run, or TrackingError when the store does not hold it or paramshare did not make it."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"run {run_id} not found in {tracking.tracking_uri()}") from None
    if "family" not in run.data.params:
        raise TrackingError(f"run {run_id} ({run.info.run_name}) was not made by paramshare: it has no "
                            f"'family' param (a parent run, or another project's run)")
    return run


def _number(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) and not float(value).is_integer() else f"{value:g}"


def _section(title: str, rows: list[tuple[str, str, str]], headers: tuple[str, str]) -> list[str]:
    if not rows:
        return [f"{title}: identical"]
    width = max(len(r[0]) for r in rows)
    col = max(len(headers[0]), *(len(r[1]) for r in rows))
    lines = [f"{title} ({len(rows)} differ)", f"  {'':<{width}}  {headers[0]:<{col}}  {headers[1]}"]
    lines += [f"  {k:<{width}}  {a:<{col}}  {b}" for k, a, b in rows]
    return lines


def diff_runs(run_a, run_b) -> str:
    """What differs between two runs: params, tags, final metric values."""
    def differing(a: dict, b: dict, skip=()) -> list[tuple[str, str, str]]:
        keys = sorted((set(a) | set(b)) - set(skip))
        return [(k, str(a.get(k, "-")), str(b.get(k, "-"))) for k in keys if a.get(k) != b.get(k)]

    names = (run_a.info.run_name, run_b.info.run_name)
    headers = (f"A {run_a.info.run_id[:8]}", f"B {run_b.info.run_id[:8]}")
    metrics = []
    ma, mb = run_a.data.metrics, run_b.data.metrics
    for k in sorted(set(ma) | set(mb)):
        if ma.get(k) != mb.get(k):
            a, b = ma.get(k), mb.get(k)
            delta = f"  ({b - a:+.6g})" if a is not None and b is not None else ""
            metrics.append((k, "-" if a is None else _number(a), ("-" if b is None else _number(b)) + delta))
    lines = [f"A: {run_a.info.run_id}  {names[0]}", f"B: {run_b.info.run_id}  {names[1]}", ""]
    lines += _section("params", differing(run_a.data.params, run_b.data.params), headers) + [""]
    lines += _section("tags", differing(run_a.data.tags, run_b.data.tags, TAGS_NOT_COMPARED), headers) + [""]
    lines += _section("final metrics", metrics, headers)
    return "\n".join(lines)


def diff(run_a: str, run_b: str) -> str:
    client = tracking.open_store()
    return diff_runs(get_run(client, run_a), get_run(client, run_b))


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check)


def recorded_params(client, run) -> dict:
    """The run's params.yaml: the logged artifact, else rebuilt from the flat params."""
    try:
        with tempfile.TemporaryDirectory() as scratch:
            path = client.download_artifacts(run.info.run_id, tracking.PARAMS_ARTIFACT, scratch)
            return yaml.safe_load(Path(path).read_text())
    except Exception:  # runs logged before the artifact existed
        nested: dict = {}
        for key, value in run.data.params.items():
            if key == "family":
                continue
            node = nested
            *path, last = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value.split(",") if key == "variants" else yaml.safe_load(value)
        return nested


def is_timing(metric: str) -> bool:
    return any(marker in metric for marker in TIMING_MARKERS)


@dataclass
class Comparison:
    rows: list[tuple[str, str, str, str]]
    differ: list[str]
    missing: list[str]
    timing: int

    @property
    def identical(self) -> bool:
        return not self.differ and not self.missing


def _same_history(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Bit-equal values at the same steps (NaN equals NaN)."""
    return sorted(a) == sorted(b) or (
        len(a) == len(b) and all(x == y or (x[0] == y[0] and math.isnan(x[1]) and math.isnan(y[1]))
                                 for x, y in zip(sorted(a), sorted(b))))


def compare_metrics(client, original, reproduced) -> Comparison:
    """Every metric's full history (per-epoch steps included), value by value."""
    rows, differ, missing, timing = [], [], [], 0
    for key in sorted(original.data.metrics):
        a = [(m.step, m.value) for m in client.get_metric_history(original.info.run_id, key)]
        b = [(m.step, m.value) for m in client.get_metric_history(reproduced.info.run_id, key)]
        last_a, last_b = original.data.metrics[key], reproduced.data.metrics.get(key)
        shown_b = "-" if last_b is None else _number(last_b)
        if is_timing(key):
            timing += 1
            verdict = "timing (not compared)"
        elif not b:
            missing.append(key)
            verdict = "MISSING"
        elif _same_history(a, b):
            verdict = "identical" if len(a) == 1 else f"identical ({len(a)} steps)"
        else:
            differ.append(key)
            verdict = f"DIFFERS ({last_b - last_a:+.3g})" if last_b is not None else "DIFFERS"
        rows.append((key, _number(last_a), shown_b, verdict))
    return Comparison(rows, differ, missing, timing)


def render_comparison(c: Comparison, original_id: str, new_id: str) -> str:
    width = max(len(r[0]) for r in c.rows)
    out = [f"{'metric':<{width}}  {'original':>12}  {'reproduced':>12}  verdict",
           *(f"{k:<{width}}  {a:>12}  {b:>12}  {v}" for k, a, b, v in c.rows), ""]
    compared = len(c.rows) - c.timing
    if c.identical:
        out.append(f"reproduced: all {compared} deterministic metrics identical, every step "
                   f"({c.timing} timing metrics not compared). original {original_id}, new {new_id}")
    else:
        missing = f", {len(c.missing)} missing" if c.missing else ""
        out.append(f"NOT reproduced: {len(c.differ)} of {compared} metrics differ{missing}. "
                   f"original {original_id}, new {new_id}")
    return "\n".join(out)


def _stage_env(worktree: Path, experiment: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(worktree / "src"), MLFLOW_TRACKING_URI=tracking.tracking_uri(),
               MLFLOW_EXPERIMENT_NAME=experiment)
    return env


def reproduce(run_id: str, log=print) -> tuple[str, Comparison]:
    """Re-train run_id from its recorded commit and params; returns (new run id, comparison)."""
    client = tracking.open_store()
    original = get_run(client, run_id)
    family = original.data.params["family"]
    commit = original.data.tags.get("git_commit")
    if not commit:
        raise TrackingError(f"run {run_id} has no git_commit tag: its code version is unknown")
    if original.data.tags.get("git_dirty") == "true":
        raise TrackingError(f"run {run_id} was trained from uncommitted code changes (git_dirty=true) "
                            f"on top of {commit[:12]}: that code cannot be restored")
    repo = tracking.repo_root()
    dirty = tracking.code_dirty()
    if dirty:
        raise TrackingError(f"working tree has uncommitted code changes ({', '.join(dirty[:3])}"
                            f"{', ...' if len(dirty) > 3 else ''}); commit or stash them first")
    if _git(repo, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode:
        raise TrackingError(f"commit {commit[:12]} of run {run_id} is not in {repo}; fetch it first "
                            f"(git fetch origin {commit})")
    params = recorded_params(client, original)
    params["variants"] = [family]
    experiment = client.get_experiment(original.info.experiment_id).name

    scratch = Path(tempfile.mkdtemp(prefix="paramshare-reproduce-"))
    worktree = scratch / "repo"
    try:
        added = _git(repo, "worktree", "add", "--detach", "--quiet", str(worktree), commit, check=False)
        if added.returncode:
            reason = (added.stderr.strip().splitlines() or ["git worktree add failed"])[-1]
            raise TrackingError(f"reproduce: cannot check out {commit[:12]}: {reason}")
        (worktree / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        raw = repo / "data" / "raw"
        if raw.is_dir():
            shutil.copytree(raw, worktree / "data" / "raw")
        env = _stage_env(worktree, experiment)
        log(f"reproducing {original.info.run_name} ({run_id}) at {commit[:12]} in {worktree}")
        for stage in (["download.py"], ["prepare.py"], ["train.py", family], ["evaluate.py", family]):
            proc = subprocess.run([sys.executable, f"stages/{stage[0]}", *stage[1:]], cwd=worktree, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
                raise TrackingError(f"reproduce: stage {' '.join(stage)} failed at {commit[:12]}: {tail[0]}")
            log(f"  {' '.join(stage)}: ok")
        new_id = json.loads((worktree / "models" / family / "run.json").read_text())["run_id"]
    finally:
        _git(repo, "worktree", "remove", "--force", str(worktree), check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    client.set_tag(new_id, "reproduces", run_id)
    return new_id, compare_metrics(client, original, client.get_run(new_id))
