"""The training loop over in-memory tensors: seeding, batching, schedule, progress.

No DataLoader and no per-sample Python: images are normalised once into one float tensor
and every batch is an index into it. Under torchrun each process takes its slice of every
global batch (see distributed.py); one process runs exactly the single-process arithmetic.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from paramshare import kernels, paths
from paramshare.config import Config, ConfigError, TrainConfig
from paramshare.data import Prepared, atomic_write, atomic_write_json, atomic_write_text, normalise, read_digest
from paramshare.distributed import Placement
from paramshare.metrics import evaluate_split, param_uses_count, unique_param_count
from paramshare.models import build


class DivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch."""


def set_threads(threads: int, processes: int = 1) -> int:
    """threads, or the cores shared out between the processes on this machine."""
    n = threads or max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(n)
    return n


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Ask glibc's malloc to keep freed blocks of up to mmap_threshold bytes for reuse.

    Every training step allocates and frees the same multi-megabyte activation and gradient
    buffers (the conv family's first layer alone: 6.4 MB at batch 64). glibc's defaults hand
    such blocks back to the kernel when they are freed (mmap'd blocks, or a trimmed heap top),
    so each step page-faults them in again: 1,000-3,000 minor faults per conv step, about a
    quarter of its time on a 2-core VM. With both thresholds raised they stay in the heap and
    are reused (peak memory of the conv train stage: +50 MB). The operations are the same, but
    buffers land at other addresses, which changes float rounding in kernels that pick their
    path by alignment: results moved in the last digits and stay bit-identical run to run.

    A no-op returning False where the C library is not glibc, or where the user chose the
    thresholds through MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES.
    """
    if any(os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _batches(n: int, steps: int, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """steps batches of indices into n items: one shuffled pass (last batch partial) when
    steps covers n exactly, else full batches from shuffled passes cycled as needed."""
    if steps == math.ceil(n / batch_size):
        order = torch.randperm(n, generator=g)
    else:
        passes = math.ceil(steps * batch_size / n)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def _last_batch_size(n: int, steps: int, batch_size: int) -> int:
    """The size of the last of _batches(n, steps, batch_size)."""
    return n - (steps - 1) * batch_size if steps == math.ceil(n / batch_size) else batch_size


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_after: int = 0


def _save_checkpoint(path: Path, epoch: int, model: nn.Module, optimizer, schedule, g: torch.Generator,
                     result: FitResult) -> None:
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "generator": g.get_state(), "history": result.history,
             "seconds": result.seconds}
    atomic_write(path, lambda fh: torch.save(state, fh))


def _restore_checkpoint(state: dict, model: nn.Module, optimizer, schedule, g: torch.Generator,
                        result: FitResult) -> int:
    """Apply the state saved after an epoch; returns that epoch."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    g.set_state(state["generator"])
    result.history, result.seconds = state["history"], state["seconds"]
    return state["epoch"]


class _Step(nn.Module):
    """One training step's forward, losses included: DistributedDataParallel must see every
    use of every parameter (the soft family's autoencoder too) inside a single forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, unlabelled: torch.Tensor | None = None):
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        aux = self.model.auxiliary_loss(unlabelled) if unlabelled is not None else None
        return logits, loss, aux


def fit(model: nn.Module, data: Prepared, cfg: TrainConfig, seed: int,
        on_epoch: Callable[[dict], None] | None = None, max_steps: int | None = None,
        checkpoint: Path | None = None, placement: Placement | None = None) -> FitResult:
    """Train model on data.labelled (and, for models with uses_unlabelled, every train image).

    Raises DivergedError on a non-finite loss before any further step is taken.
    max_steps caps the steps per epoch (smoke runs). With a checkpoint path, the whole
    training state (weights, optimiser, schedule, batch-order generator, history) is saved
    there after every epoch, and when cfg.resume finds one, training continues after its
    epoch: the batch order and every update then match an uninterrupted run exactly.

    With a placement of several processes, every rank draws the same global batches and
    trains on its slice; each local loss is weighted by its slice's share of the global batch
    times the world size, so DDP's gradient average equals the single-process gradient. Only
    rank 0 validates, calls on_epoch, keeps the history and writes the checkpoint.
    """
    place = placement or Placement()
    keep_freed_memory()
    g = seed_everything(seed)
    model.to(place.device)
    if place.device.type == "cpu":
        kernels.build_for(model)
    every = normalise(data.train_images).to(place.device)
    images = every[data.labelled.to(place.device)]
    labels = data.train_labels[data.labelled].long().to(place.device)
    val_images, val_labels = normalise(data.val_images).to(place.device), data.val_labels.long().to(place.device)
    uses_unlabelled = getattr(model, "uses_unlabelled", False)

    n = len(labels)
    driver = max(n, len(every)) if uses_unlabelled else n
    steps = math.ceil(driver / cfg.batch_size)
    if max_steps:
        steps = min(steps, max_steps)
    total_steps = steps * cfg.epochs
    smallest = _last_batch_size(n, steps, cfg.batch_size)
    if uses_unlabelled:
        smallest = min(smallest, _last_batch_size(len(every), steps, cfg.batch_size))
    if smallest < place.world:
        raise ConfigError(f"train.batch_size: a batch of {smallest} images cannot be split over {place.world} "
                          f"processes; use fewer processes or a batch size that leaves every process an image")

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    if cfg.lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps)))
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    step_fn = place.wrap(_Step(model))

    result = FitResult()
    done = 0
    saved = None
    if checkpoint is not None and cfg.resume and place.main and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
    saved = place.broadcast(saved)
    if saved is not None:
        done = result.resumed_after = _restore_checkpoint(saved, model, optimizer, schedule, g, result)
        if place.main:
            print(f"resuming after epoch {done}/{cfg.epochs} from {checkpoint}", flush=True)
            for entry in result.history:
                if on_epoch:
                    on_epoch(entry)
    started = time.perf_counter() - result.seconds
    for epoch in range(done + 1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        labelled_batches = _batches(n, steps, cfg.batch_size, g)
        unlabelled_batches = _batches(len(every), steps, cfg.batch_size, g) if uses_unlabelled else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=place.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=place.device)
        correct = torch.zeros((), dtype=torch.int64, device=place.device)
        seen = 0
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   mininterval=1.0, file=sys.stderr, disable=None if place.main else True)
        for step in bar:
            global_idx = labelled_batches[step]
            idx = place.shard(global_idx).to(place.device)
            x, y = images[idx], labels[idx]
            unlabelled = None
            if uses_unlabelled:
                global_u = unlabelled_batches[step]
                local_u = place.shard(global_u).to(place.device)
                unlabelled = every[local_u]
            logits, loss, aux = step_fn(x, y, unlabelled)
            total = loss if aux is None else loss + aux
            value = total.item()
            if not math.isfinite(value):
                raise DivergedError(f"loss is {value} at epoch {epoch}, batch {step + 1}/{steps}; "
                                    f"lower train.lr (now {cfg.lr})")
            if place.world > 1:
                total = loss * (len(idx) * place.world / len(global_idx))
                if aux is not None:
                    total = total + aux * (len(local_u) * place.world / len(global_u))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * len(idx)
            if aux is not None:
                aux_sum += aux.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(idx)
            if step % 50 == 0:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{seen * place.world / max(elapsed, 1e-9):.0f}")
        bar.close()
        seen_all = torch.tensor(seen, dtype=torch.int64, device=place.device)
        place.sum(loss_sum, aux_sum, correct, seen_all)
        seen = int(seen_all)
        seconds = time.perf_counter() - t0
        if not place.main:
            continue
        val = evaluate_split(model, val_images, val_labels)
        entry = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / seen,
            "train_acc": int(correct) / seen,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "lr": schedule.get_last_lr()[0],
            "epoch_seconds": seconds,
            "images_per_s": seen / seconds,
        }
        if uses_unlabelled:
            entry["train_aux_loss"] = float(aux_sum) / seen
        result.history.append(entry)
        print(f"epoch {epoch}/{cfg.epochs} train_loss {entry['train_loss']:.4f} "
              f"train_acc {entry['train_acc']:.4f} val_loss {entry['val_loss']:.4f} "
              f"val_acc {entry['val_acc']:.4f} {seconds:.1f}s {entry['images_per_s']:.0f} img/s",
              flush=True)
        if on_epoch:
            on_epoch(entry)
        result.seconds = time.perf_counter() - started
        if checkpoint is not None:
            _save_checkpoint(checkpoint, epoch, model, optimizer, schedule, g, result)
    result.seconds = time.perf_counter() - started
    return result


def checkpoint_key(cfg: Config, family: str, digest: str) -> str:
    """What a checkpoint is valid for: every param that decides the result, and the data."""
    relevant = cfg.to_dict()
    relevant["train"] = {k: v for k, v in relevant["train"].items() if k not in ("threads", "resume")}
    relevant.pop("variants")
    blob = json.dumps({"family": family, "params": relevant, "data": digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_variant(cfg: Config, family: str, max_steps: int | None = None) -> dict | None:
    """The train stage: train one family at cfg, track it in MLflow, write the model, its
    history and its metrics. The metrics file is written last: a failed run leaves none.

    Under torchrun every rank trains; rank 0 alone tracks and writes, and returns the summary
    (the other ranks return None)."""
    from paramshare import distributed, tracking

    place = distributed.start(cfg.train.device)
    try:
        set_threads(cfg.train.threads, place.local_world)
        data = Prepared.load(paths.PREPARED)
        hparams = dataclasses.asdict(cfg.model.family(family))
        seed_everything(cfg.seed)
        model = build(family, cfg.model.tied, hparams)
        digest = read_digest(paths.PREPARED_META)
        state_path = None if max_steps else paths.checkpoint(family, checkpoint_key(cfg, family, digest))
        if not place.main:
            fit(model, data, cfg.train, cfg.seed, max_steps=max_steps, checkpoint=state_path, placement=place)
            return None
        run_file = state_path.with_suffix(".run") if state_path else None
        previous = run_file.read_text().strip() if run_file and cfg.train.resume and run_file.is_file() else None
        with tracking.training_run(family, cfg, digest, resumes=previous) as run:
            if run_file:
                atomic_write_text(run_file, run.run_id)
            run.set_tag("device", str(place.device))
            run.set_tag("processes", str(place.world))
            result = fit(model, data, cfg.train, cfg.seed, on_epoch=run.log_epoch, max_steps=max_steps,
                         checkpoint=state_path, placement=place)
            run.flush()
            model.to("cpu")
            if result.resumed_after:
                run.set_tag("resumed_after_epoch", str(result.resumed_after))
            run.set_tag("kernels", kernels.report())
            final = result.history[-1]
            summary = {
                "family": family,
                "tied": cfg.model.tied,
                "epochs": len(result.history),
                **{k: final[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
                "train_seconds": result.seconds,
                "images_per_s": sum(h["images_per_s"] for h in result.history) / len(result.history),
                "unique_params": unique_param_count(model),
                "param_uses": param_uses_count(model),
            }
            run.log_metrics({k: summary[k] for k in ("train_seconds", "unique_params", "param_uses")})
            checkpoint = {"family": family, "tied": cfg.model.tied, "hparams": hparams,
                          "state_dict": model.state_dict()}
            out = paths.model_dir(family)
            atomic_write(out / "model.pt", lambda fh: torch.save(checkpoint, fh))
            run.log_model(model, normalise(data.test_images[:2]))
            atomic_write_json(out / "run.json", run.reference())
            atomic_write_json(paths.history(family), result.history)
            atomic_write_json(paths.train_metrics(family), summary)
        if state_path is not None:
            state_path.unlink(missing_ok=True)
            run_file.unlink(missing_ok=True)
        return summary
    finally:
        distributed.stop()
