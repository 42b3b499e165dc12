import pytest
import torch

from paramshare import tracking
from paramshare.config import Config
from paramshare.metrics import unique_param_count
from paramshare.models import build


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
    import mlflow
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
    loaded = tracking.load_model(run.run_id)
    assert loaded.cells[0] is loaded.cells[27]
    assert unique_param_count(loaded) == unique_param_count(model)
    torch.testing.assert_close(loaded(example), model(example))
    assert tracking.log_to_run(run.run_id, {"test_acc": 0.5})
    assert client.get_run(run.run_id).data.metrics["test_acc"] == 0.5


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_dies_is_marked(store, error, status):
    import mlflow
    with pytest.raises(type(error)):
        with tracking.training_run("mlp", Config(), "d") as run:
            raise error
    assert mlflow.tracking.MlflowClient().get_run(run.run_id).info.status == status


def test_logging_to_a_missing_run_says_so(store):
    assert tracking.log_to_run("0" * 32, {"x": 1.0}) is False
