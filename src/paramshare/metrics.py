"""Accuracy, loss, confusion, generalisation gap, throughput and parameter counting."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


def unique_param_count(model: nn.Module) -> int:
    """Trainable numbers, each shared tensor counted once (state_dict would count every use)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen.setdefault(p.data_ptr(), p.numel())
    return sum(seen.values())


def param_uses_count(model: nn.Module) -> int:
    """Numbers the model would hold if every use of a shared tensor were its own copy."""
    return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def shared_parameters(model: nn.Module) -> dict[str, list[str]]:
    """{first name: [every name]} for each tensor registered under more than one name."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p.data_ptr(), []).append(name)
    return {v[0]: v for v in names.values() if len(v) > 1}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def evaluate_split(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Loss, accuracy and predictions of model on normalised images."""
    logits = predict(model, images)
    pred = logits.argmax(1)
    return {
        "loss": F.cross_entropy(logits, labels.long()).item(),
        "acc": (pred == labels).float().mean().item(),
        "pred": pred,
    }


def confusion(labels: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """confusion[true, predicted] counts."""
    flat = labels.long() * NUM_CLASSES + pred.long()
    return torch.bincount(flat, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def per_class_accuracy(matrix: torch.Tensor) -> list[float]:
    totals = matrix.sum(1).clamp(min=1)
    return (matrix.diagonal() / totals).tolist()


def inference_throughput(model: nn.Module, images: torch.Tensor, repeats: int = 3,
                         batch_size: int = 1000) -> float:
    """Images per second of model.eval() prediction, the median of several passes."""
    sample = images[: min(len(images), 5000)]
    predict(model, sample[:batch_size], batch_size)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(model, sample, batch_size)
        times.append(time.perf_counter() - t0)
    return len(sample) / sorted(times)[len(times) // 2]
