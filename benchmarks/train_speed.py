"""Training speed, measured in ONE run so that ratios are fair on a noisy machine.

Times, on the same MNIST data and batch size:
  * the reference loop: ../shared/reference/mnist_cnn_reference.py as written (its CNN class,
    torchvision MNIST + per-sample ToTensor/Normalize + DataLoader, Adam), and the same loop
    on paramshare's ConvNet (the same function, 211,690 parameters) to tell the model's gain
    from the loop's;
  * paramshare's in-memory loop (paramshare.training.fit) on every family, tied and untied;
  * the machine's matmul rate, to express each model's achieved GFLOP/s as a fraction of it;
  * one process against N torch.distributed (DDP, gloo) processes under torchrun, same global batch.

Each figure is the median over --repeats timed chunks of --steps optimiser steps.

    python benchmarks/train_speed.py [--steps 100] [--repeats 3] [--families conv,recurrent] [--processes 1,2]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from paramshare import distributed
from paramshare.config import Config, TrainConfig
from paramshare.data import Prepared, load_raw, normalise, prepare
from paramshare.metrics import evaluate_split
from paramshare.models import FAMILIES, build
from paramshare.training import fit, seed_everything, set_threads

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(n: int = 1024, repeats: int = 7) -> float:
    """The machine's fp32 matmul rate: the best of `repeats` timings, so that noise from other
    processes lowers it less (a low peak would flatter every model's share of it)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        times.append((time.perf_counter() - t0) / 10)
    return 2 * n ** 3 / min(times) / 1e9


def training_flops_per_image(model: torch.nn.Module) -> float:
    """Forward FLOPs counted by torch's FlopCounterMode, times 3 for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if getattr(model, "uses_unlabelled", False):
            out = out.sum() + model.auxiliary_loss(x)
    return 3.0 * counter.get_total_flops()


class ReferenceCNN(nn.Module):
    """SharedWeightsCNN of ../shared/reference/mnist_cnn_reference.py, verbatim."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=3, stride=1, padding=1)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, padding=0)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = x.view(-1, 32 * 7 * 7)
        x = self.relu(self.fc1(x))
        x = self.fc2(x)
        return x


def paramshare_cnn() -> nn.Module:
    return build("conv", True, dataclasses.asdict(Config().model.conv))


def reference_loop(mirror: Path, steps: int, repeats: int, batch_size: int, epochs: int = 0,
                   make_model: Callable[[], nn.Module] = ReferenceCNN) -> tuple[float, float | None]:
    """Images/s of the reference DataLoader loop (median of repeats) on make_model(), and, when
    epochs > 0, its test accuracy after that many full epochs from a fresh model."""
    from torchvision import datasets, transforms
    root = Path(tempfile.mkdtemp(prefix="mnist-ref-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(mirror / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    try:
        torch.manual_seed(0)
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        dataset = datasets.MNIST(root=str(root), train=True, transform=transform, download=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
        rates = []
        it = iter(loader)
        for chunk in range(repeats + 1):
            t0 = time.perf_counter()
            for _ in range(steps):
                try:
                    images, labels = next(it)
                except StopIteration:
                    it = iter(loader)
                    images, labels = next(it)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
            if chunk:
                rates.append(steps * batch_size / (time.perf_counter() - t0))
        accuracy = None
        if epochs:
            torch.manual_seed(0)
            model = make_model()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(epochs):
                for images, labels in loader:
                    optimizer.zero_grad()
                    F.cross_entropy(model(images), labels).backward()
                    optimizer.step()
            test = datasets.MNIST(root=str(root), train=False, transform=transform, download=False)
            images = torch.stack([test[i][0] for i in range(len(test))])
            accuracy = evaluate_split(model, images, test.targets)["acc"]
        return statistics.median(rates), accuracy
    finally:
        shutil.rmtree(root, ignore_errors=True)


def paramshare_loop(data, family: str, tied: bool, steps: int, repeats: int, batch_size: int,
                    placement: distributed.Placement | None = None) -> float:
    """Images/s of paramshare.training.fit over `steps` steps (median of repeats; warm-up dropped).
    Under torchrun (a placement of several ranks) the images of every rank are counted."""
    cfg = Config()
    hparams = dataclasses.asdict(cfg.model.family(family))
    train = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3)
    seed_everything(0)
    model = build(family, tied, hparams)
    rates = []
    for chunk in range(repeats + 1):
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            result = fit(model, data, train, chunk, max_steps=steps, placement=placement)
        if chunk and result.history:
            rates.append(result.history[0]["images_per_s"])
    return statistics.median(rates) if rates else 0.0


def ddp_worker(args) -> None:
    """One torchrun rank of the processes comparison: rank 0 prints its images/s as JSON."""
    place = distributed.start("cpu")
    set_threads(0, place.local_world)
    data = prepare(load_raw(Path(args.mirror)), val_size=5000, train_size=55000, seed=0)
    try:
        rate = paramshare_loop(data, args.family_under_test, True, args.steps, args.repeats, args.batch_size, place)
    finally:
        distributed.stop()
    if place.main:
        print(json.dumps({"images_per_s": rate}))


def processes_rate(args, family: str, processes: int) -> float:
    """Images/s of `family` with `processes` DDP processes on this machine (cores shared out)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--ddp-worker", "--family-under-test", family, "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--batch-size", str(args.batch_size), "--mirror", args.mirror]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_s"]


def paramshare_accuracy(data, epochs: int, batch_size: int) -> float:
    """Test accuracy of the reference CNN after `epochs` epochs of paramshare's loop on all
    60,000 training images, Adam 1e-3 constant, as the reference loop trains it."""
    seed_everything(0)
    model = build("conv", True, dataclasses.asdict(Config().model.conv))
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, lr_schedule="constant")
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        fit(model, data, train, 0)
    return evaluate_split(model, normalise(data.test_images), data.test_labels)["acc"]


BELOW_30_PERCENT = {
    "conv untied": "784 + 196 per-position matrices of 64 x 9..288 x 32: each too small to run BLAS "
                   "near peak; the gather of the patches and the bias reduction cost as much again",
    "recurrent": "28 sequential steps of a 64 x 128 GRU cell: each step's matmuls are too small and "
                 "must wait for the previous step, so per-op overhead dominates",
    "attention": "49-token attention: the softmax and the per-head 49 x 49 matmuls are memory-bound",
    "mlp": "a 784-256-256-10 MLP at batch 64 is three small matmuls: Adam's update and the loss "
           "are a large share of the step",
    "soft": "two small MLPs per step; the optimiser update over both is a large share",
    "conv tied": "oneDNN's 3x3 convolutions on 28x28 and 14x14 maps at batch 64, plus pooling",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--accuracy-epochs", type=int, default=1,
                        help="also train the reference CNN this many full epochs in both loops and compare "
                             "test accuracy (0: skip)")
    parser.add_argument("--mirror", default=os.environ.get("PARAMSHARE_MNIST_MIRROR",
                                                           str(ROOT.parent / "shared" / "data" / "mnist")))
    parser.add_argument("--processes", default="1,2",
                        help="torch.distributed process counts to compare on conv and mlp (empty: skip)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family-under-test", default="conv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return
    threads = set_threads(0)
    mirror = Path(args.mirror)
    data = prepare(load_raw(mirror), val_size=5000, train_size=55000, seed=0)
    raw = load_raw(mirror)
    everything = Prepared(raw["train_images"], raw["train_labels"], torch.arange(len(raw["train_labels"])),
                          raw["test_images"][:10], raw["test_labels"][:10], raw["test_images"], raw["test_labels"])

    peak = matmul_gflops()
    print(f"{time.strftime('%Y-%m-%d')}  {os.cpu_count()} cores, {threads} torch threads, "
          f"torch {torch.__version__}, matmul {peak:.1f} GFLOP/s (1024x1024 fp32)\n")
    ref, ref_acc = reference_loop(mirror, args.steps, args.repeats, args.batch_size, args.accuracy_epochs)
    print(f"{'model':<22} {'images/s':>9} {'s/epoch':>8} {'x ref':>6} {'GFLOP/s':>8} {'% matmul':>9}")
    ref_flops = training_flops_per_image(paramshare_cnn())
    same_model, _ = reference_loop(mirror, args.steps, args.repeats, args.batch_size, make_model=paramshare_cnn)
    for name, rate in (("reference loop", ref), ("  on paramshare ConvNet", same_model)):
        print(f"{name:<22} {rate:>9.0f} {55000 / rate:>8.1f} {rate / ref:>6.2f} "
              f"{rate * ref_flops / 1e9:>8.1f} {100 * rate * ref_flops / 1e9 / peak:>8.0f}%")
    below: dict[str, str] = {}
    for family in args.families.split(","):
        for tied in (True, False):
            if family == "mlp" and not tied:
                continue
            rate = paramshare_loop(data, family, tied, args.steps, args.repeats, args.batch_size)
            flops = training_flops_per_image(build(family, tied, dataclasses.asdict(Config().model.family(family))))
            name = f"{family} {'tied' if tied else 'untied'}"
            share = rate * flops / 1e9 / peak
            print(f"{name:<22} {rate:>9.0f} {55000 / rate:>8.1f} {rate / ref:>6.2f} "
                  f"{rate * flops / 1e9:>8.1f} {100 * share:>8.0f}%", flush=True)
            if share < 0.3:
                below[name] = BELOW_30_PERCENT.get(name) or BELOW_30_PERCENT.get(family, "")
    if below:
        print("\nbelow 30% of the matmul rate, and why:")
        for name, why in below.items():
            print(f"  {name}: {why}")
    if args.accuracy_epochs:
        ours = paramshare_accuracy(everything, args.accuracy_epochs, args.batch_size)
        print(f"\nsame maths: reference CNN, {args.accuracy_epochs} epoch(s) on 60,000 images, Adam 1e-3, "
              f"batch {args.batch_size}: test accuracy reference loop {100 * ref_acc:.2f}%, "
              f"paramshare loop {100 * ours:.2f}%")
    counts = [int(n) for n in args.processes.split(",") if n]
    if counts:
        print(f"\ntorch.distributed (DDP, gloo) under torchrun, global batch {args.batch_size}, "
              f"{os.cpu_count()} cores shared out between the processes:")
        print(f"{'model':<22} " + " ".join(f"{f'{n} proc img/s':>14}" for n in counts) + f" {'speed-up':>9}")
        for family in ("conv", "mlp"):
            rates = [processes_rate(args, family, n) for n in counts]
            print(f"{family + ' tied':<22} " + " ".join(f"{r:>14.0f}" for r in rates)
                  + f" {rates[-1] / rates[0]:>8.2f}x", flush=True)
    again = matmul_gflops()
    if again > peak:
        print(f"\n(matmul re-measured at the end: {again:.1f} GFLOP/s; % matmul above used {peak:.1f})")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak_rss:.0f} MiB")


if __name__ == "__main__":
    main()
