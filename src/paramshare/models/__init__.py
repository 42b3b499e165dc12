"""The registry of sharing families: one module each, tied and untied twins behind one flag."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from paramshare.config import FAMILIES as FAMILY_NAMES
from paramshare.models.attention import PatchTransformer
from paramshare.models.conv import ConvNet, LocallyConnected2d
from paramshare.models.mlp import MLP
from paramshare.models.recurrent import RowGRU
from paramshare.models.soft import SoftTiedPair

FAMILIES: dict[str, type[nn.Module]] = {
    "conv": ConvNet,
    "recurrent": RowGRU,
    "attention": PatchTransformer,
    "soft": SoftTiedPair,
    "mlp": MLP,
}
assert tuple(FAMILIES) == FAMILY_NAMES

SHARES_ACROSS = {
    "conv": "space: one kernel for every position",
    "recurrent": "time: one GRU cell for every row",
    "attention": "depth: one encoder block for every layer",
    "soft": "models: L2 penalty between classifier and autoencoder encoders",
    "mlp": "nothing: reference, model.tied has no effect",
}


def build(family: str, tied: bool, hparams: Mapping[str, Any]) -> nn.Module:
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family](tied=tied, **hparams)


__all__ = ["FAMILIES", "SHARES_ACROSS", "build", "ConvNet", "LocallyConnected2d", "RowGRU",
           "PatchTransformer", "SoftTiedPair", "MLP"]
