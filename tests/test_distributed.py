"""torch.distributed: 2 gloo processes under torchrun against 1 process on the same global batches."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from paramshare.config import TrainConfig
from paramshare.distributed import Placement, PlacementError, resolve_device
from paramshare.metrics import shared_parameters, unique_param_count
from paramshare.models import build
from paramshare.training import fit, seed_everything

from .conftest import ROOT, interrupt_in_epoch_2, resumed_after

TRAIN = {"epochs": 2, "batch_size": 31, "lr": 3e-3}
CASES = {
    "attention-tied": {"family": "attention", "tied": True, "max_steps": 4,
                       "hparams": {"patch": 7, "width": 16, "heads": 2, "depth": 3, "mlp_ratio": 2}},
    "recurrent-tied": {"family": "recurrent", "tied": True, "max_steps": 4, "hparams": {"hidden": 16}},
    "conv-untied": {"family": "conv", "tied": False, "max_steps": 3, "hparams": {"channels": 4, "hidden": 16}},
    "soft-tied": {"family": "soft", "tied": True, "max_steps": 4, "hparams": {"hidden": 16, "strength": 0.1}},
}
TIMING = ("epoch_seconds", "images_per_s")


def torchrun(*args, env=None, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *args], cwd=cwd,
                          env=env or {**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(small_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    small_prepared.save(out / "mnist.pt")
    cases = {name: {**case, "train": TRAIN} for name, case in CASES.items()}
    proc = torchrun("--nproc_per_node=2", str(ROOT / "tests/ddp_worker.py"), str(out / "mnist.pt"), str(out),
                    json.dumps(cases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1)] for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(name, two_ranks, small_prepared):
    """Batches of 31 split 16 + 15: each rank's loss is weighted by its share, so the
    all-reduced gradient, every update and the logged metrics are the single-process ones.

    One exception: an attention key bias adds the same amount to every logit of a query, which
    softmax ignores, so its true gradient is 0 and what is computed is rounding noise that Adam
    scales to steps of up to lr. Its value is only bounded by lr x steps."""
    case = CASES[name]
    seed_everything(0)
    model = build(case["family"], case["tied"], case["hparams"])
    single = fit(model, small_prepared, TrainConfig(**TRAIN), 0, max_steps=case["max_steps"])
    rank0, rank1 = two_ranks[name]
    for key, tensor in model.state_dict().items():
        mine = rank0["state"][key]
        if key.endswith("qkv.bias"):
            width = case["hparams"]["width"]
            keys = slice(width, 2 * width)
            bound = TRAIN["lr"] * TRAIN["epochs"] * case["max_steps"]
            torch.testing.assert_close(mine[keys], tensor[keys], rtol=0, atol=bound, msg=key)
            mine, tensor = mine.clone(), tensor.clone()
            mine[keys] = tensor[keys] = 0
        torch.testing.assert_close(mine, tensor, rtol=1e-4, atol=2e-5, msg=key)
        assert torch.equal(rank0["state"][key], rank1["state"][key]), f"{key} differs between ranks"
    for key, p in model.named_parameters():
        torch.testing.assert_close(rank0["grads"][key], p.grad, rtol=1e-3, atol=1e-6, msg=key)
    assert not rank1["history"]
    for mine, theirs in zip(rank0["history"], single.history, strict=True):
        for key, value in theirs.items():
            if key not in TIMING:
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("name", ["attention-tied", "recurrent-tied"])
def test_tied_parameters_stay_one_tensor_with_one_value_on_every_rank(name, two_ranks):
    """DDP must neither untie a shared tensor (each use its own copy) nor let ranks drift."""
    case = CASES[name]
    groups = shared_parameters(build(case["family"], True, case["hparams"]))
    assert groups and all(len(names) == (case["hparams"]["depth"] if name.startswith("attention") else 28)
                          for names in groups.values())
    rank0, rank1 = two_ranks[name]
    for first, names in groups.items():
        assert rank0["shared"][first] == rank1["shared"][first] == names
        for other in names:
            assert torch.equal(rank0["state"][other], rank0["state"][first])
            assert torch.equal(rank1["state"][other], rank0["state"][first])
        assert torch.equal(rank0["grads"][first], rank1["grads"][first])
        assert rank0["grads"][first].abs().sum() > 0


def test_a_batch_too_small_to_split_is_refused(small_prepared):
    from paramshare.config import ConfigError
    model = build("mlp", True, {"hidden": 8})
    with pytest.raises(ConfigError, match="train.batch_size: a batch of 1 images cannot be split over 2"):
        fit(model, small_prepared, TrainConfig(epochs=1, batch_size=1), 0, max_steps=2,
            placement=Placement(rank=0, world=2))


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PlacementError, match="train.device: cuda asked for"):
            resolve_device("cuda")
        expected = "mps" if torch.backends.mps.is_available() else "cpu"
        assert resolve_device("auto").type == expected
    else:
        assert resolve_device("auto", local_rank=0).type == "cuda"


STAGE = [sys.executable, str(ROOT / "stages/train.py"), "recurrent"]


def distributed_workspace(prepared, root, epochs):
    """Prepared data and params for a 2-process recurrent train stage; returns the stage's env."""
    prepared.save(root / "data/prepared/mnist.pt")
    (root / "data/prepared/meta.json").write_text(json.dumps({"digest": prepared.digest()}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=epochs, batch_size=50, distributed=2, device="cpu")
    params["model"]["recurrent"]["hidden"] = 16
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(ROOT / "src")}


def test_the_train_stage_hands_itself_to_torchrun_and_rank_0_alone_tracks_and_writes(small_prepared, tmp_path):
    import mlflow

    env = distributed_workspace(small_prepared, tmp_path, epochs=2)
    uri = env["MLFLOW_TRACKING_URI"]
    proc = subprocess.run(STAGE, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 2/2 ") == 1
    summary = json.loads((tmp_path / "metrics/train/recurrent.json").read_text())
    assert summary["epochs"] == 2
    assert summary["unique_params"] == unique_param_count(build("recurrent", True, {"hidden": 16}))
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("paramshare").experiment_id])
    models = [r for r in runs if r.data.tags.get("run_role") != "parent"]
    assert len(models) == 1 and models[0].info.status == "FINISHED"
    assert models[0].data.tags["processes"] == "2" and models[0].data.tags["device"] == "cpu"
    assert models[0].data.params["train.distributed"] == "2"
    assert [m.step for m in client.get_metric_history(models[0].info.run_id, "val_acc")] == [1, 2]


@pytest.mark.slow
def test_a_terminated_distributed_stage_resumes_to_the_weights_of_an_uninterrupted_one(small_prepared, tmp_path):
    """SIGTERM reaches torchrun (the stage execs into it), which passes it to both ranks; rank 0
    marks the run KILLED. The re-run's rank 0 reads the checkpoint and broadcasts it, and both
    ranks continue to exactly the weights of a distributed run never stopped."""
    reference, root = tmp_path / "reference", tmp_path / "interrupted"
    done = subprocess.run(STAGE, cwd=reference, env=distributed_workspace(small_prepared, reference, epochs=6),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    env = distributed_workspace(small_prepared, root, epochs=6)
    returncode, err = interrupt_in_epoch_2(STAGE, root, env, timeout=120)
    assert returncode != 0
    assert not (root / "metrics").exists()
    assert len(list((root / "checkpoints").glob("recurrent-*.pt"))) == 1

    resumed = subprocess.run(STAGE, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = resumed_after(resumed.stdout)
    assert 1 <= after < 6
    def weights(where):
        return torch.load(where / "models/recurrent/model.pt", weights_only=True)["state_dict"]

    mine = weights(root)
    for name, tensor in weights(reference).items():
        assert torch.equal(tensor, mine[name]), name

    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("paramshare").experiment_id],
                              order_by=["attributes.start_time ASC"])
    killed, finished = [r for r in runs if r.data.tags.get("run_role") != "parent"]
    assert killed.info.status == "KILLED" and finished.info.status == "FINISHED"
    assert finished.data.tags["resumes_run"] == killed.info.run_id
    assert [m.step for m in client.get_metric_history(finished.info.run_id, "val_acc")] == list(range(1, 7))
