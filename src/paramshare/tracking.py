"""The one place that talks to MLflow: store location, run names, tags, models.

The embedded default store is SQLite at the repository root, anchored there even when DVC
runs a stage in a copy of the repository (`dvc exp run --temp/--queue` works in
<repo>/.dvc/tmp/exps/...): a relative URI would write into that copy and be lost.

A store that goes away mid-run never leaves a silent gap: per-epoch metrics that cannot be
written are kept in memory and sent again after each epoch; if they still cannot be sent when
training ends, the run fails with TrackingError before any output is written (the stage's
per-epoch checkpoint is kept, so re-running it logs every epoch again).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import mlflow
import requests
import torch
import urllib3
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from paramshare import signals
from paramshare.config import Config, flatten
from paramshare.errors import TrackingError

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "paramshare"
PACKAGE_DIR = Path(__file__).resolve().parent
EXP_WORKSPACE = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The user's repository: $DVC_ROOT or the cwd, lifted out of a DVC experiment copy."""
    here = Path(start or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    text = str(here) + os.sep
    if EXP_WORKSPACE in text:
        return Path(text[: text.index(EXP_WORKSPACE)])
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir() or (candidate / ".git").exists():
            return candidate
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


PROBE_TIMEOUT_S = 5.0
PARAMS_ARTIFACT = "params.yaml"
# MLflow's own defaults retry a failed request 7 times with backoff 2 and wait 120 s for an
# answer: minutes before a lost server is noticed. These apply unless the user set them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RETRY_ENV = "PARAMSHARE_TRACKING_RETRY_S"
RETRY_BUDGET_S = 60.0
STORE_ERRORS = (MlflowException, requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _cap_http_retries(uri: str) -> None:
    if _is_server(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)


def _store_name(uri: str) -> str:
    return f"MLflow tracking server {uri}" if _is_server(uri) else f"MLflow store {uri}"


def _probe_server(uri: str) -> None:
    """Fail within seconds, naming the URI, when a tracking server does not answer
    (MLflow's own client would retry for minutes)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise TrackingError(f"MLflow tracking server {uri} answered HTTP {exc.code} on /health") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, or "
                            f"unset MLFLOW_TRACKING_URI to use the embedded store") from None


def store_error_line(exc: Exception) -> str:
    text = exc.message if isinstance(exc, MlflowException) else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def _reason(exc: Exception) -> str:
    """The gist of a failed write: the OS error when there is one (MLflow wraps a refused
    connection in a few hundred characters of urllib3 detail), else the first line, cut short."""
    text = store_error_line(exc)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if found:
        return found.group(0).strip()
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _writing(uri: str, what: str) -> Iterator[None]:
    """A write to the store, interrupts held back; a failure is one TrackingError line."""
    with signals.deferred():
        try:
            yield
        except STORE_ERRORS as exc:
            raise TrackingError(f"{_store_name(uri)}: {what} failed: {_reason(exc)}") from None


def retry_budget() -> float:
    """Seconds TrainingRun.flush keeps retrying: $PARAMSHARE_TRACKING_RETRY_S, else RETRY_BUDGET_S."""
    value = os.environ.get(RETRY_ENV)
    if not value:
        return RETRY_BUDGET_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise TrackingError(f"{RETRY_ENV}: got {value!r}; allowed: seconds >= 0")
    return seconds


def open_store(uri: str | None = None) -> MlflowClient:
    """A client on an existing store, for reading: never creates one (MLflow would create a
    missing SQLite file and its directories); TrackingError naming the URI otherwise."""
    from sqlalchemy.exc import SQLAlchemyError

    uri = uri or tracking_uri()
    if _is_embedded(uri) and not _sqlite_path(uri).is_file():
        raise TrackingError(f"MLflow store {uri} cannot be opened: no database file at "
                            f"{_sqlite_path(uri)}; run the pipeline first or set MLFLOW_TRACKING_URI")
    _cap_http_retries(uri)
    if _is_server(uri):
        _probe_server(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except (MlflowException, SQLAlchemyError) as exc:
        raise TrackingError(f"MLflow store {uri} cannot be opened: {store_error_line(exc)}") from None
    return client


def setup() -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    Creating the SQLite schema from several processes at once can race, so the first
    use is serialised with a file lock beside the database. For a server, MLflow's HTTP
    retries are capped (HTTP_DEFAULTS) so that losing it mid-run shows within seconds.
    """
    uri = tracking_uri()
    _cap_http_retries(uri)
    if _is_server(uri):
        _probe_server(uri)
    mlflow.set_tracking_uri(uri)
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    lock = contextlib.nullcontext()
    if _is_embedded(uri):
        lock = _file_lock(_lock_path(uri))
    with lock:
        client = MlflowClient()
        try:
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            artifacts = None
            if _is_embedded(uri):
                artifacts = (_sqlite_path(uri).parent / "mlartifacts").as_uri()
            return client.create_experiment(name, artifact_location=artifacts)
        except MlflowException as exc:
            raise TrackingError(f"MLflow store {uri} cannot be used: {exc.message.splitlines()[0]}") from None


def _lock_path(uri: str) -> Path:
    path = _sqlite_path(uri).with_name(_sqlite_path(uri).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


CODE_PATHS = ("src", "stages", "pyproject.toml")
PROJECT_TAG = ("project", "paramshare")


def code_dirty() -> list[str]:
    """Tracked files under the code paths that differ from HEAD: results made with them
    cannot be traced to a commit. Params, dvc.lock and metrics do not count: the params
    are logged in full and the rest are outputs."""
    out = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return [line.split(maxsplit=1)[1] for line in out.splitlines()] if out else []


def study_key() -> str:
    """What groups runs under one parent: the baseline commit of a DVC experiment (so every
    experiment of one sweep shares it), else HEAD; `+dirty` when the code is modified."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD") or "no-git"
    return rev + ("+dirty" if code_dirty() else "")


def parent_run(experiment_id: str) -> str:
    """Find or create the parent run of this pipeline run or sweep; returns its id.

    The UI's run list nests every model under it, so tied and untied twins of one study
    line up in one group for the compare view. Find-or-create is serialised with the same
    lock as the schema creation for the embedded store."""
    key = study_key()
    client = MlflowClient()
    uri = tracking_uri()
    lock = _file_lock(_lock_path(uri)) if _is_embedded(uri) else contextlib.nullcontext()
    with lock:
        found = client.search_runs([experiment_id], f"tags.study_key = '{key}' and tags.run_role = 'parent'",
                                   max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
        tags = {"study_key": key, "run_role": "parent", PROJECT_TAG[0]: PROJECT_TAG[1],
                "mlflow.note.content": "Parent of every model trained from this commit or DVC experiment "
                                       "baseline; select its children and Compare to line up tied and "
                                       "untied twins."}
        run = client.create_run(experiment_id, run_name=f"study@{key[:8]}{'+dirty' if key.endswith('+dirty') else ''}",
                                tags=tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id


def run_name(family: str, cfg: Config) -> str:
    tie = "tied" if cfg.model.tied else "untied"
    return f"{family}/{tie}/n={cfg.data.train_size}/seed={cfg.seed}"


def run_tags(family: str, cfg: Config, data_digest: str) -> dict[str, str]:
    tags = {
        "family": family,
        "tied": str(cfg.model.tied).lower(),
        "train_size": str(cfg.data.train_size),
        "seed": str(cfg.seed),
        "data_digest": data_digest,
        PROJECT_TAG[0]: PROJECT_TAG[1],
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        tags["git_dirty"] = str(bool(code_dirty())).lower()
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev"),
                     ("DVC_STAGE", "dvc_stage")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


class TrainingRun:
    """Handle on the active MLflow run of one trained model.

    Per-epoch metrics the store does not take are kept in `pending` with their step and
    timestamp and sent again, in order, before every later write. Sending an epoch again that
    the store had in fact taken (its answer lost) adds nothing: a metric is identified by key,
    step, timestamp and value.
    """

    def __init__(self, run: mlflow.ActiveRun, uri: str | None = None, retry_s: float | None = None):
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.uri = uri or tracking_uri()
        self.retry_s = retry_budget() if retry_s is None else retry_s
        self.pending: list[tuple[int, dict[str, float], int]] = []
        self.last_error = ""
        self._warned = False

    def log_epoch(self, entry: dict) -> None:
        """Log one epoch's metrics (step = epoch); never raises for a store that is away."""
        metrics = {k: float(v) for k, v in entry.items() if k != "epoch"}
        self.pending.append((int(entry["epoch"]), metrics, int(time.time() * 1000)))
        if self._deliver():
            return
        if not self._warned:
            self._warned = True
            print(f"warning: {_store_name(self.uri)} did not take the metrics of epoch {self.pending[0][0]} "
                  f"({self.last_error}); training goes on: they are kept and sent again after every epoch",
                  file=sys.stderr, flush=True)

    def _deliver(self) -> bool:
        """Send the pending epochs, oldest first, stopping at the first failure; True when none is left."""
        first = self.pending[0][0] if self.pending else None
        sent = 0
        while self.pending:
            epoch, metrics, timestamp = self.pending[0]
            try:
                with signals.deferred():
                    mlflow.log_metrics(metrics, step=epoch, timestamp=timestamp, run_id=self.run_id)
            except STORE_ERRORS as exc:
                self.last_error = _reason(exc)
                return False
            self.pending.pop(0)
            sent += 1
        if self._warned and sent:
            self._warned = False
            print(f"{_store_name(self.uri)} is back: the metrics of {_epochs(first, first + sent - 1)} are logged",
                  file=sys.stderr, flush=True)
        return True

    def flush(self) -> None:
        """Deliver every pending epoch, retrying with backoff for retry_s seconds;
        TrackingError when they still cannot be sent."""
        if not self.pending:
            return
        deadline = time.monotonic() + self.retry_s
        delay = 1.0
        while not self._deliver():
            left = deadline - time.monotonic()
            if left <= 0:
                first, last, n = self.pending[0][0], self.pending[-1][0], len(self.pending)
                raise TrackingError(
                    f"{_store_name(self.uri)} has taken no metrics since epoch {first} ({self.last_error}): "
                    f"{n} epoch{'s' if n > 1 else ''} of metrics ({_epochs(first, last)}) not logged in run "
                    f"{self.run_id}; re-run the stage when the server is back: it resumes from its checkpoint "
                    f"and logs every epoch again")
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)

    def set_tag(self, key: str, value: str) -> None:
        self.flush()
        with _writing(self.uri, f"setting tag {key} of run {self.run_id}"):
            mlflow.set_tag(key, value)

    def log_metrics(self, metrics: dict) -> None:
        self.flush()
        with _writing(self.uri, f"logging the final metrics of run {self.run_id}"):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_model(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """Pickle serialisation keeps shared tensors shared (MLflow's pt2 default unties
        them); the package travels with the model through code_paths."""
        model.eval()
        with torch.no_grad():
            output = model(example).numpy()
        self.flush()
        with _writing(self.uri, f"logging the model of run {self.run_id}"):
            mlflow.pytorch.log_model(
                model, name="model", serialization_format="pickle",
                signature=infer_signature(example.numpy(), output), input_example=example.numpy(),
                code_paths=[str(PACKAGE_DIR)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])

    def reference(self) -> dict:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": tracking_uri()}


def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def _end_failed_run(uri: str, run_id: str, status: str) -> None:
    """Mark a run that died; a store that is gone gets one warning line, so that the error
    that killed the run is the one reported."""
    try:
        with signals.deferred():
            mlflow.end_run(status=status)
    except STORE_ERRORS as exc:
        print(f"warning: {_store_name(uri)} could not mark run {run_id} {status} ({_reason(exc)})",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def training_run(family: str, cfg: Config, data_digest: str, resumes: str | None = None) -> Iterator[TrainingRun]:
    """One MLflow run per trained model; ends FAILED on an error, KILLED on an interrupt.
    Every pending epoch is delivered (TrainingRun.flush) before it is marked FINISHED.

    resumes: the id of the run whose checkpoint this one continues. It is tagged on the new
    run; if the store still shows it RUNNING (its process lost the server and could not mark
    it), it is marked FAILED and tagged superseded_by, so no stale run looks alive."""
    retry_s = retry_budget()
    experiment_id = setup()
    uri = tracking_uri()
    tags = run_tags(family, cfg, data_digest)
    if resumes:
        tags["resumes_run"] = resumes
    with _writing(uri, "starting a run"):
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name(family, cfg),
                               parent_run_id=parent_run(experiment_id), tags=tags)
    handle = TrainingRun(run, uri, retry_s)
    try:
        if resumes:
            _supersede(uri, resumes, handle.run_id)
        with _writing(uri, f"logging the params of run {handle.run_id}"):
            mlflow.log_params({"family": family, **flatten(cfg.to_dict())})
            mlflow.log_dict(cfg.to_dict(), PARAMS_ARTIFACT)
        yield handle
        handle.flush()
    except KeyboardInterrupt:
        _end_failed_run(uri, handle.run_id, "KILLED")
        raise
    except BaseException:
        _end_failed_run(uri, handle.run_id, "FAILED")
        raise
    with _writing(uri, f"marking run {handle.run_id} FINISHED"):
        mlflow.end_run(status="FINISHED")


def _supersede(uri: str, old: str, new: str) -> None:
    client = MlflowClient()
    try:
        stale = client.get_run(old).info.status == "RUNNING"
    except MlflowException:
        return
    if stale:
        with _writing(uri, f"marking the lost run {old} FAILED"):
            client.set_tag(old, "superseded_by", new)
            client.set_terminated(old, "FAILED")


def log_to_run(run_id: str, metrics: dict) -> bool:
    """Add final metrics to a finished run; False when the store does not hold it."""
    setup()
    client = MlflowClient()
    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    with signals.deferred():
        for i in range(0, len(items), 500):
            client.log_batch(run_id, metrics=items[i:i + 500])
    return True


def load_model(run_id: str) -> torch.nn.Module:
    setup()
    return mlflow.pytorch.load_model(f"runs:/{run_id}/model")
