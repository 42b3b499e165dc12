"""Tracking against a real `mlflow server` (SQLite and PostgreSQL backends): a train stage logs
to it, and a server lost mid-run leaves no silent gap."""
import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import sqlalchemy
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from paramshare import config, tracking
from paramshare.config import Config
from paramshare.errors import TrackingError
from paramshare.metrics import unique_param_count

from .conftest import ROOT

MLFLOW = Path(sys.executable).parent / "mlflow"
SERVER_START_S = 180
PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` in its own process group on 127.0.0.1; start() again after kill() brings
    it back on the same port, backend and artifacts."""

    def __init__(self, backend: str, root: Path):
        self.backend = backend
        self.root = root
        self.artifacts = root / "artifacts"
        self.port = _free_port()
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        cmd = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", self.backend, "--artifacts-destination", str(self.artifacts)]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"mlflow server: no /health in {SERVER_START_S}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(autouse=True)
def _mlflow_defaults(monkeypatch):
    """Each test starts with MLflow's own HTTP settings (tracking.setup sets them in os.environ),
    and leaves MLflow's global tracking URI as it found it."""
    for name in tracking.HTTP_DEFAULTS:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.delenv(tracking.RETRY_ENV, raising=False)
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return versions[-1] if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 with a database `mlflow` owned by user `mlflow`;
    yields its SQLAlchemy URI. Postgres refuses to run as root: as root it runs as `nobody`, in
    a directory under /tmp that user owns."""
    import psycopg
    from psycopg import sql

    binaries = {name: _pg_binary(name) for name in ("initdb", "postgres", "pg_ctl")}
    as_user: list[str] = []
    if os.geteuid() == 0:
        binaries["runuser"] = shutil.which("runuser")
    missing = [name for name, path in binaries.items() if path is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL binaries not found: {', '.join(missing)} (.ci/run installs Debian's postgresql)")
        pytest.skip(f"PostgreSQL binaries not found: {', '.join(missing)}")
    base = Path(tempfile.mkdtemp(prefix="paramshare-pg-"))
    password = "pg-" + os.urandom(8).hex()
    (base / "pwfile").write_text(password + "\n")
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (base, base / "pwfile"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        as_user = [binaries["runuser"], "-u", "nobody", "--"]
    data = base / "data"
    port = _free_port()
    subprocess.run([*as_user, binaries["initdb"], "-D", str(data), "-U", "postgres", f"--pwfile={base / 'pwfile'}",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                   cwd=base, check=True, capture_output=True, timeout=120)
    log = open(base / "postgres.log", "w")
    proc = subprocess.Popen([*as_user, binaries["postgres"], "-D", str(data), "-k", str(base), "-h", "127.0.0.1",
                             "-p", str(port), "-c", "fsync=off"],
                            cwd=base, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=password,
                                       dbname="postgres", connect_timeout=2, autocommit=True)
                break
            except psycopg.OperationalError:
                assert proc.poll() is None and time.monotonic() < deadline, (base / "postgres.log").read_text()
                time.sleep(0.2)
        with conn:
            conn.execute(sql.SQL("CREATE ROLE mlflow LOGIN PASSWORD {}").format(password))
            conn.execute("CREATE DATABASE mlflow OWNER mlflow")
        yield f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, binaries["pg_ctl"], "-D", str(data), "-m", "fast", "-w", "stop"], cwd=base,
                       capture_output=True, timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _running(server: Server):
    server.start()
    try:
        yield server
    finally:
        server.kill(signal.SIGTERM)


@pytest.fixture
def server(tmp_path):
    """A tracking server on an SQLite backend."""
    root = tmp_path / "server"
    root.mkdir()
    yield from _running(Server(f"sqlite:///{root / 'server.db'}", root))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_server(request, tmp_path):
    """A tracking server on each backend."""
    root = tmp_path / "server"
    root.mkdir()
    backend = request.getfixturevalue("postgres") if request.param == "postgresql" else f"sqlite:///{root / 's.db'}"
    yield from _running(Server(backend, root))


@pytest.fixture(scope="module")
def prepared_4000(raw_mnist):
    """Enough labelled images for conv epochs of about two seconds on one thread."""
    from paramshare.data import prepare
    return prepare(raw_mnist, val_size=200, train_size=4000, seed=0)


def _workspace(root: Path, prepared, **train) -> Path:
    prepared.save(root / "data/prepared/mnist.pt")
    (root / "data/prepared/meta.json").write_text(json.dumps({"digest": prepared.digest()}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(threads=1, **train)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _stage_env(uri: str, experiment: str, **extra: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment,
            "PYTHONPATH": str(ROOT / "src"), **extra}


def _stage(family: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages/train.py"), family]


def _start_stage(workspace: Path, family: str, env: dict) -> subprocess.Popen:
    """The train stage in the background, stdout and stderr to files (read with _outputs)."""
    with open(workspace / "stdout.txt", "w") as out, open(workspace / "stderr.txt", "w") as err:
        return subprocess.Popen(_stage(family), cwd=workspace, env=env, stdout=out, stderr=err, text=True)


def _outputs(workspace: Path) -> tuple[str, str]:
    return (workspace / "stdout.txt").read_text(), (workspace / "stderr.txt").read_text()


def _wait_for_first_epoch(server: Server, experiment: str, proc: subprocess.Popen, workspace: Path) -> str:
    """Poll the server until the stage's run holds epoch 1's metrics; returns the run id."""
    client = MlflowClient(tracking_uri=server.uri)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            runs = client.search_runs([found.experiment_id], "metrics.val_acc >= 0")
            if runs:
                return runs[0].info.run_id
        time.sleep(0.1)
    raise AssertionError(f"no epoch 1 on the server (stage rc {proc.poll()}):\n{_outputs(workspace)[1][-3000:]}")


def _assert_every_epoch(client: MlflowClient, run_id: str, history: list[dict]) -> None:
    for key in PER_EPOCH:
        logged = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert logged == [(e["epoch"], e[key]) for e in history], key


def test_a_train_stage_logs_to_a_tracking_server_and_its_model_loads_back_tied(any_server, small_prepared, tmp_path):
    workspace = _workspace(tmp_path / "ws", small_prepared, epochs=2)
    proc = subprocess.run(_stage("recurrent"), cwd=workspace, env=_stage_env(any_server.uri, "served"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads((workspace / "models/recurrent/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=any_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    engine = sqlalchemy.create_engine(any_server.backend)
    with engine.connect() as db:
        stored = db.execute(sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": run_id}).scalar()
    engine.dispose()
    assert stored == "FINISHED"
    history = json.loads((workspace / "plots/history/recurrent.json").read_text())
    assert [e["epoch"] for e in history] == [1, 2]
    _assert_every_epoch(client, run_id, history)

    mlflow.set_tracking_uri(any_server.uri)
    logged_params = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{tracking.PARAMS_ARTIFACT}"))
    assert config.from_dict(logged_params) == config.load(workspace / "params.yaml")
    assert list(any_server.artifacts.rglob("MLmodel")), "the model is not in the server's artifact store"
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    summary = json.loads((workspace / "metrics/train/recurrent.json").read_text())
    assert loaded.cells[0] is loaded.cells[27]
    assert unique_param_count(loaded) == summary["unique_params"] < summary["param_uses"]
    trained = torch.load(workspace / "models/recurrent/model.pt", weights_only=True)["state_dict"]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_a_lost_server_is_noticed_in_seconds_and_the_run_fails_naming_the_missing_epochs(server, monkeypatch,
                                                                                           capsys):
    """In-process, on a server killed mid-run: log_epoch keeps the metrics and returns within
    seconds; the end of the run retries for the (shrunk) budget, cannot mark the run FAILED,
    and raises one TrackingError naming the URI and the epochs. A user's own HTTP setting stays."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lost")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    monkeypatch.setattr(tracking, "RETRY_BUDGET_S", 2.0)
    with pytest.raises(TrackingError) as raised:
        with tracking.training_run("mlp", Config(), "d") as run:
            run.log_epoch({"epoch": 1, "val_acc": 0.5})
            server.kill()
            t0 = time.monotonic()
            run.log_epoch({"epoch": 2, "val_acc": 0.6})
            run.log_epoch({"epoch": 3, "val_acc": 0.7})
            assert time.monotonic() - t0 < 20
            assert [(epoch, metrics) for epoch, metrics, _ in run.pending] == [(2, {"val_acc": 0.6}),
                                                                               (3, {"val_acc": 0.7})]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    message = str(raised.value)
    assert message.startswith(f"MLflow tracking server {server.uri} has taken no metrics since epoch 2 (")
    assert message.endswith(f"2 epochs of metrics (epochs 2-3) not logged in run {run.run_id}; re-run the stage "
                            "when the server is back: it resumes from its checkpoint and logs every epoch again")
    err = _ours(capsys.readouterr().err)
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert warnings[0].startswith(f"warning: MLflow tracking server {server.uri} did not take the metrics of epoch 2 (")
    assert warnings[1].startswith(f"warning: MLflow tracking server {server.uri} could not mark run {run.run_id} "
                                  "FAILED (")


@pytest.mark.slow
def test_a_server_lost_mid_run_and_back_leaves_no_gap(server, prepared_4000, tmp_path):
    epochs = 6
    workspace = _workspace(tmp_path / "ws", prepared_4000, epochs=epochs)
    proc = _start_stage(workspace, "conv", _stage_env(server.uri, "back"))
    try:
        run_id = _wait_for_first_epoch(server, "back", proc, workspace)
        server.kill()
        time.sleep(2)
        server.start()
        proc.wait(timeout=600)
    finally:
        proc.kill()
    out, err = _outputs(workspace)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((workspace / "models/conv/run.json").read_text())["run_id"] == run_id
    client = MlflowClient(tracking_uri=server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    history = json.loads((workspace / "plots/history/conv.json").read_text())
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))
    _assert_every_epoch(client, run_id, history)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert warnings[0].startswith(f"warning: MLflow tracking server {server.uri} did not take the metrics of epoch 2 (")
    back = [line for line in err.splitlines() if line.startswith(f"MLflow tracking server {server.uri} is back")]
    assert len(back) == 1 and "epochs 2-" in back[0], err


@pytest.mark.slow
def test_a_server_lost_for_good_fails_the_stage_with_no_outputs_and_a_rerun_logs_every_epoch(
        server, prepared_4000, tmp_path):
    epochs = 4
    workspace = _workspace(tmp_path / "ws", prepared_4000, epochs=epochs)
    env = _stage_env(server.uri, "gone", **{tracking.RETRY_ENV: "3"})
    proc = _start_stage(workspace, "conv", env)
    try:
        lost_run = _wait_for_first_epoch(server, "gone", proc, workspace)
        server.kill()
        t0 = time.monotonic()
        proc.wait(timeout=600)
        failed_within = time.monotonic() - t0
    finally:
        proc.kill()
    out, err = _outputs(workspace)
    assert proc.returncode == 1, err[-3000:]
    assert failed_within < 60
    assert err.strip().splitlines()[-1] == (
        f"error: MLflow tracking server {server.uri} has taken no metrics since epoch 2 ([Errno 111] Connection "
        f"refused): {epochs - 1} epochs of metrics (epochs 2-{epochs}) not logged in run {lost_run}; re-run the stage "
        "when the server is back: it resumes from its checkpoint and logs every epoch again")
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == \
        [f"{e}/{epochs}" for e in range(1, epochs + 1)]
    assert not any((workspace / d).exists() for d in ("models", "metrics", "plots"))
    assert len(list((workspace / "checkpoints").glob("conv-*.pt"))) == 1

    server.start()
    rerun = subprocess.run(_stage("conv"), cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming after epoch {epochs}/{epochs}" in rerun.stdout
    assert not list((workspace / "checkpoints").iterdir())
    run_id = json.loads((workspace / "models/conv/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_after_epoch"] == str(epochs)
    assert run.data.tags["resumes_run"] == lost_run
    history = json.loads((workspace / "plots/history/conv.json").read_text())
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))
    _assert_every_epoch(client, run_id, history)
    lost = client.get_run(lost_run)
    assert lost.info.status == "FAILED", "the run that lost the server must not look alive"
    assert lost.data.tags["superseded_by"] == run_id
    assert [m.step for m in client.get_metric_history(lost_run, "val_acc")] == [1]


@pytest.fixture(scope="module")
def _store_db(tmp_path_factory):
    return tmp_path_factory.mktemp("store") / "mlflow.db"


@pytest.fixture
def store(_store_db, request, monkeypatch):
    """An embedded store shared by this module's tests (its schema takes seconds to create),
    one experiment per test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{_store_db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)


def _ours(stderr: str) -> list[str]:
    """stderr without MLflow's own timestamped log lines."""
    return [line for line in stderr.splitlines() if not re.match(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", line)]


def _failing(times: int, real):
    calls = {"failed": 0}

    def log_metrics(*args, **kwargs):
        if calls["failed"] < times:
            calls["failed"] += 1
            raise MlflowException("API request failed with exception [Errno 111] Connection refused")
        return real(*args, **kwargs)
    return log_metrics


def test_epochs_the_store_refused_are_sent_again_with_their_steps_and_times(store, monkeypatch, capsys):
    monkeypatch.setattr(mlflow, "log_metrics", _failing(2, mlflow.log_metrics))
    before = {}
    with tracking.training_run("mlp", Config(), "d") as run:
        for epoch in (1, 2, 3):
            before[epoch] = int(time.time() * 1000)
            run.log_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "val_acc": epoch / 10})
            assert len(run.pending) == (epoch if epoch < 3 else 0)
            time.sleep(0.05)
    client = MlflowClient()
    assert client.get_run(run.run_id).info.status == "FINISHED"
    for key, value in (("train_loss", lambda e: 1.0 / e), ("val_acc", lambda e: e / 10)):
        history = client.get_metric_history(run.run_id, key)
        assert [(m.step, m.value) for m in history] == [(e, value(e)) for e in (1, 2, 3)]
        for m in history:
            assert before[m.step] <= m.timestamp < before[m.step] + 50
    uri = tracking.tracking_uri()
    assert _ours(capsys.readouterr().err) == [
        f"warning: MLflow store {uri} did not take the metrics of epoch 1 ([Errno 111] Connection refused); "
        "training goes on: they are kept and sent again after every epoch",
        f"MLflow store {uri} is back: the metrics of epochs 1-3 are logged"]


def test_a_store_that_stays_away_fails_the_run_after_the_retry_budget(store, monkeypatch):
    monkeypatch.setattr(mlflow, "log_metrics", _failing(10**6, mlflow.log_metrics))
    monkeypatch.setenv(tracking.RETRY_ENV, "1.5")
    with pytest.raises(TrackingError, match=r"since epoch 1 \(.*\): 2 epochs of metrics \(epochs 1-2\) not logged"):
        with tracking.training_run("mlp", Config(), "d") as run:
            run.log_epoch({"epoch": 1, "val_acc": 0.1})
            run.log_epoch({"epoch": 2, "val_acc": 0.2})
            t0 = time.monotonic()
    assert 1.5 <= time.monotonic() - t0 < 5
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"
    monkeypatch.setenv(tracking.RETRY_ENV, "soon")
    with pytest.raises(TrackingError, match=f"{tracking.RETRY_ENV}: got 'soon'; allowed: seconds >= 0"):
        tracking.retry_budget()
    started = len(MlflowClient().search_runs([run.experiment_id]))
    with pytest.raises(TrackingError, match=f"{tracking.RETRY_ENV}: got 'soon'"):
        with tracking.training_run("mlp", Config(), "d"):
            pytest.fail("a bad retry budget must be refused before the run starts")
    assert len(MlflowClient().search_runs([run.experiment_id])) == started


def test_a_run_that_cannot_be_marked_failed_reports_the_error_that_killed_it(store, monkeypatch, capsys):
    def gone(*args, **kwargs):
        raise MlflowException("API request failed with exception [Errno 111] Connection refused")

    with pytest.raises(RuntimeError, match="the real failure"):
        with tracking.training_run("mlp", Config(), "d") as run:
            monkeypatch.setattr(MlflowClient, "set_terminated", gone)
            raise RuntimeError("the real failure")
    assert _ours(capsys.readouterr().err) == [
        f"warning: MLflow store {tracking.tracking_uri()} could not mark run {run.run_id} FAILED "
        "([Errno 111] Connection refused)"]
    assert mlflow.active_run() is None
