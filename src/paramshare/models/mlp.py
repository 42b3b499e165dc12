"""The no-sharing reference: 784 -> 256 -> 256 -> 10. `tied` is accepted and has no effect."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, tied: bool = True, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
