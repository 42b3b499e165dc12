"""Training speed, measured in ONE run so that ratios are fair on a noisy machine.

Times, on the same MNIST data and batch size:
  * the reference loop: ../shared/reference/mnist_cnn_reference.py as written (its CNN class,
    torchvision MNIST + per-sample ToTensor/Normalize + DataLoader, Adam), in a process of its
    own with the C library's default malloc settings, as a user runs it; then, to tell the
    gains apart, the same loop with the malloc setting paramshare's loop makes
    (training.keep_freed_memory), and with that on paramshare's ConvNet (the same function,
    211,690 parameters; channels-last, its first layer one fused kernel);
  * paramshare's in-memory loop (paramshare.training.fit) on every family, tied and untied (the
    conv family also with PyTorch's ops instead of the fused kernel, paramshare.kernels);
  * the machine's matmul rate, to express each model's achieved GFLOP/s as a fraction of it;
  * one process against N torch.distributed (DDP, gloo) processes under torchrun, same global batch.

Each figure is the median over --repeats timed chunks of --steps optimiser steps, after one
warm-up chunk. The headline (reference CNN: paramshare's loop against the reference loop)
alternates chunks of the reference loop, paramshare's loop and paramshare's loop with PyTorch's
ops instead of the fused kernel, --rounds times, and reports every round's ratios, so that the
machine's drift (large on a shared VM) can neither fake nor hide a gain.

    python benchmarks/train_speed.py [--steps 100] [--repeats 3] [--families conv,recurrent] [--processes 1,2]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import itertools
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

from paramshare import distributed, kernels
from paramshare.config import Config, TrainConfig
from paramshare.data import Prepared, load_raw, normalise, prepare
from paramshare.metrics import evaluate_split
from paramshare.models import FAMILIES, build
from paramshare.training import fit, keep_freed_memory, seed_everything, set_threads

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
    """Forward FLOPs counted by torch's FlopCounterMode, times 3 for forward + backward; with
    PyTorch's ops, as the counter does not see inside the fused kernel."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 1, 28, 28)
    with kernels.disabled(), FlopCounterMode(display=False) as counter:
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


class ReferenceLoop:
    """The reference DataLoader loop on make_model(), run a chunk of steps at a time."""

    def __init__(self, mirror: Path, batch_size: int, make_model: Callable[[], nn.Module] = ReferenceCNN):
        from torchvision import datasets, transforms
        self.root = Path(tempfile.mkdtemp(prefix="mnist-ref-"))
        raw = self.root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            with gzip.open(mirror / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        self.make_model, self.batch_size = make_model, batch_size
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        dataset = datasets.MNIST(root=str(self.root), train=True, transform=self.transform, download=False)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
        torch.manual_seed(0)
        self.model = make_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batches = iter(self.loader)

    def chunk(self, steps: int) -> float:
        """Images/s over the next `steps` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            try:
                images, labels = next(self.batches)
            except StopIteration:
                self.batches = iter(self.loader)
                images, labels = next(self.batches)
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(images), labels)
            loss.backward()
            self.optimizer.step()
        return steps * self.batch_size / (time.perf_counter() - t0)

    def accuracy(self, epochs: int) -> float:
        """Test accuracy after `epochs` full epochs from a fresh model."""
        from torchvision import datasets
        torch.manual_seed(0)
        model = self.make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            for images, labels in self.loader:
                optimizer.zero_grad()
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
        test = datasets.MNIST(root=str(self.root), train=False, transform=self.transform, download=False)
        images = torch.stack([test[i][0] for i in range(len(test))])
        return evaluate_split(model, images, test.targets)["acc"]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


REFERENCE_MODELS = {"reference": ReferenceCNN, "paramshare": paramshare_cnn}


def reference_worker(args) -> None:
    """The reference loop in this fresh process, driven over stdin: `chunk` runs --steps steps and
    prints their images/s, `accuracy N` prints the test accuracy after N epochs (JSON lines)."""
    set_threads(0)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("keep_freed_memory had no effect here (not glibc, or MALLOC_* set)")
    loop = ReferenceLoop(Path(args.mirror), args.batch_size, REFERENCE_MODELS[args.reference_model])
    try:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command, *rest = line.split()
            if command == "chunk":
                print(json.dumps({"images_per_s": loop.chunk(args.steps)}), flush=True)
            elif command == "accuracy":
                print(json.dumps({"accuracy": loop.accuracy(int(rest[0]))}), flush=True)
    finally:
        loop.close()


class ReferenceProcess:
    """A reference loop in a child process: this process's malloc settings (paramshare's loop
    changes them) and memory state do not reach it, yet its chunks can alternate with ours."""

    def __init__(self, args, model: str, kept: bool):
        command = [sys.executable, __file__, "--reference-worker", "--reference-model", model,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--mirror", args.mirror]
        self.proc = subprocess.Popen(command + (["--keep-freed-memory"] if kept else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the reference loop process failed (exit {self.proc.wait()})")
        return json.loads(line)

    def _ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def chunk(self) -> float:
        return self._ask("chunk")["images_per_s"]

    def accuracy(self, epochs: int) -> float:
        return self._ask(f"accuracy {epochs}")["accuracy"]

    def median(self, repeats: int) -> float:
        """Median images/s of `repeats` chunks after one warm-up chunk."""
        self.chunk()
        return statistics.median(self.chunk() for _ in range(repeats))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def paramshare_chunks(data, family: str, tied: bool, steps: int, batch_size: int,
                      placement: distributed.Placement | None = None) -> Callable[[], float]:
    """A function that runs `steps` more steps of paramshare.training.fit on one model and
    returns their images/s (under torchrun, every rank's images; 0.0 on ranks other than 0)."""
    hparams = dataclasses.asdict(Config().model.family(family))
    train = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3)
    seed_everything(0)
    model = build(family, tied, hparams)
    chunks = itertools.count()

    def run() -> float:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            result = fit(model, data, train, next(chunks), max_steps=steps, placement=placement)
        return result.history[0]["images_per_s"] if result.history else 0.0
    return run


def paramshare_loop(data, family: str, tied: bool, steps: int, repeats: int, batch_size: int,
                    placement: distributed.Placement | None = None) -> float:
    """Median images/s of `repeats` chunks of fit after one warm-up chunk."""
    run = paramshare_chunks(data, family, tied, steps, batch_size, placement)
    run()
    return statistics.median(run() for _ in range(repeats))


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
    parser.add_argument("--rounds", type=int, default=7,
                        help="chunks of the reference loop and of paramshare's conv loop (fused kernel, then "
                             "PyTorch's ops), alternated; the headline ratio is the median of the rounds' ratios")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--accuracy-epochs", type=int, default=1,
                        help="also train the reference CNN this many full epochs in both loops and compare "
                             "test accuracy (0: skip)")
    parser.add_argument("--mirror", default=os.environ.get("PARAMSHARE_MNIST_MIRROR",
                                                           str(ROOT.parent / "shared" / "data" / "mnist")))
    parser.add_argument("--processes", default="1,2",
                        help="torch.distributed process counts to compare on conv and mlp (empty: skip)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference-model", choices=sorted(REFERENCE_MODELS), default="reference",
                        help=argparse.SUPPRESS)
    parser.add_argument("--keep-freed-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family-under-test", default="conv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return
    if args.reference_worker:
        reference_worker(args)
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
    reference = ReferenceProcess(args, "reference", kept=False)
    ours = paramshare_chunks(data, "conv", True, args.steps, args.batch_size)
    plain = paramshare_chunks(data, "conv", True, args.steps, args.batch_size)

    def plain_chunk() -> float:
        with kernels.disabled():
            return plain()

    reference.chunk()
    ours()
    plain_chunk()
    rounds = [(reference.chunk(), ours(), plain_chunk()) for _ in range(args.rounds)]
    ref_acc = reference.accuracy(args.accuracy_epochs) if args.accuracy_epochs else None
    reference.close()
    ref = statistics.median(r for r, _, _ in rounds)
    print(f"{'model':<24} {'images/s':>9} {'s/epoch':>8} {'x ref':>6} {'GFLOP/s':>8} {'% matmul':>9}")

    def row(name: str, rate: float, flops: float) -> float:
        """Print one table row; returns the share of the matmul rate."""
        share = rate * flops / 1e9 / peak
        print(f"{name:<24} {rate:>9.0f} {55000 / rate:>8.1f} {rate / ref:>6.2f} {rate * flops / 1e9:>8.1f} "
              f"{100 * share:>8.0f}%", flush=True)
        return share

    ref_flops = training_flops_per_image(paramshare_cnn())
    rows = [("reference loop", ref)]
    for name, model in (("  + freed memory kept", "reference"), ("  + paramshare ConvNet", "paramshare")):
        variant = ReferenceProcess(args, model, kept=True)
        rows.append((name, variant.median(args.repeats)))
        variant.close()
    for name, rate in rows:
        row(name, rate, ref_flops)
    below: dict[str, str] = {}
    for family in args.families.split(","):
        for tied in (True, False):
            if family == "mlp" and not tied:
                continue
            if (family, tied) == ("conv", True):
                rate = statistics.median(mine for _, mine, _ in rounds)
            else:
                rate = paramshare_loop(data, family, tied, args.steps, args.repeats, args.batch_size)
            flops = training_flops_per_image(build(family, tied, dataclasses.asdict(Config().model.family(family))))
            name = f"{family} {'tied' if tied else 'untied'}"
            if row(name, rate, flops) < 0.3:
                below[name] = BELOW_30_PERCENT.get(name) or BELOW_30_PERCENT.get(family, "")
            if (family, tied) == ("conv", True):
                row("  PyTorch ops only", statistics.median(p for _, _, p in rounds), flops)
    ratios = [mine / theirs for theirs, mine, _ in rounds]
    print(f"\nreference CNN, paramshare loop against the reference loop, {args.rounds} alternating chunks: "
          + ", ".join(f"{x:.2f}x" for x in ratios) + f" (median {statistics.median(ratios):.2f}x)")
    gains = [mine / p for _, mine, p in rounds]
    print("the fused first layer against PyTorch's ops, the same rounds: "
          + ", ".join(f"{x:.2f}x" for x in gains) + f" (median {statistics.median(gains):.2f}x)")
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
        print(f"{'model':<24} " + " ".join(f"{f'{n} proc img/s':>14}" for n in counts) + f" {'speed-up':>9}")
        for family in ("conv", "mlp"):
            rates = [processes_rate(args, family, n) for n in counts]
            print(f"{family + ' tied':<24} " + " ".join(f"{r:>14.0f}" for r in rates)
                  + f" {rates[-1] / rates[0]:>8.2f}x", flush=True)
    again = matmul_gflops()
    if again > peak:
        print(f"\n(matmul re-measured at the end: {again:.1f} GFLOP/s; % matmul above used {peak:.1f})")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak_rss:.0f} MiB")


if __name__ == "__main__":
    main()
