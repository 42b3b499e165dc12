import dataclasses
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from paramshare.config import TrainConfig
from paramshare.models import build
from paramshare.training import DivergedError, _batches, fit, seed_everything

TINY = TrainConfig(epochs=2, batch_size=32, lr=1e-3)


def train_once(data, family="recurrent", seed=0, **hparams):
    seed_everything(seed)
    model = build(family, True, hparams or {"hidden": 16})
    result = fit(model, data, TINY, seed, max_steps=4)
    return model, result


def test_same_seed_same_metrics_and_weights(small_prepared):
    a_model, a = train_once(small_prepared)
    b_model, b = train_once(small_prepared)
    strip = [{k: v for k, v in h.items() if k not in ("epoch_seconds", "images_per_s")} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k not in ("epoch_seconds", "images_per_s")}
                     for h in b.history]
    for p, q in zip(a_model.state_dict().values(), b_model.state_dict().values()):
        assert torch.equal(p, q)
    c_model, _ = train_once(small_prepared, seed=1)
    assert not torch.equal(a_model.readout.weight, c_model.readout.weight)


def test_history_has_every_epoch_and_the_schedule_decays(small_prepared):
    _, result = train_once(small_prepared)
    assert [h["epoch"] for h in result.history] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
        assert all(key in h for h in result.history)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= result.history[-1]["val_acc"] <= 1.0


def test_training_learns(small_prepared):
    seed_everything(0)
    model = build("mlp", True, {"hidden": 64})
    result = fit(model, small_prepared, dataclasses.replace(TINY, epochs=5, lr=3e-3, batch_size=16), 0)
    assert result.history[-1]["val_acc"] > 0.7
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan")) * self.w


def test_nan_loss_stops_with_epoch_and_batch(small_prepared):
    with pytest.raises(DivergedError, match=r"loss is nan at epoch 1, batch 1/"):
        fit(Exploding(), small_prepared, TINY, 0)


def test_soft_family_steps_over_every_training_image(small_prepared):
    seed_everything(0)
    model = build("soft", True, {"hidden": 8, "strength": 1e-3})
    result = fit(model, small_prepared, dataclasses.replace(TINY, epochs=1, batch_size=4096), 0)
    assert len(small_prepared.train_labels) > 4096
    assert "train_aux_loss" in result.history[0]


def test_batches_cover_once_or_cycle():
    g = torch.Generator().manual_seed(0)
    once = _batches(10, 3, 4, g)
    assert [len(b) for b in once] == [4, 4, 2]
    assert sorted(torch.cat(once).tolist()) == list(range(10))
    cycled = _batches(10, 5, 4, g)
    assert [len(b) for b in cycled] == [4] * 5
    assert set(torch.cat(cycled).tolist()) == set(range(10))


FAULTS_PER_STEP = """
import resource, sys, torch, torch.nn.functional as F
from paramshare.models import build
from paramshare.training import keep_freed_memory
torch.set_num_threads(2)
kept = keep_freed_memory() if sys.argv[1] == "kept" else False
torch.manual_seed(0)
model = build("conv", True, {"channels": 32, "hidden": 128})
optimizer = torch.optim.Adam(model.parameters(), fused=True)
images, labels = torch.randn(1000, 1, 28, 28), torch.randint(0, 10, (1000,))
def step():
    idx = torch.randint(0, 1000, (64,))
    loss = F.cross_entropy(model(images[idx]), labels[idx])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 60)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_ends_the_page_faults_of_each_step():
    """Each conv step frees and re-allocates multi-MB buffers; with glibc's defaults they often go
    back to the kernel and fault in again (66-1,900 faults per step seen here), kept they do not."""
    def faults(mode: str, **env) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, **env}).stdout.split()
        return out[0], float(out[1])

    kept, kept_faults = faults("kept")
    assert kept == "True" and kept_faults < 50
    assert faults("default")[1] > 2 * kept_faults
    assert faults("kept", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
