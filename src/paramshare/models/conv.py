"""Sharing across space: convolution against its untied twin, the locally-connected layer.

The tied model is the reference CNN exactly (211,690 parameters): one 3x3 kernel per
channel pair, slid over every position. The untied twin keeps every shape and receptive
field but gives each output position its own kernel and bias.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LocallyConnected2d(nn.Module):
    """Conv2d without weight sharing: weight (positions, out, in*k*k), bias (out, H, W).

    Computed as unfold + one batched matmul over positions, not a loop over them.
    """

    def __init__(self, in_channels: int, out_channels: int, in_size: int, kernel_size: int,
                 padding: int = 0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding = kernel_size, padding
        self.out_size = in_size + 2 * padding - kernel_size + 1
        fan_in = in_channels * kernel_size * kernel_size
        positions = self.out_size * self.out_size
        self.weight = nn.Parameter(torch.empty(positions, out_channels, fan_in))
        self.bias = nn.Parameter(torch.empty(out_channels, self.out_size, self.out_size))
        bound = 1.0 / math.sqrt(fan_in)  # nn.Conv2d's default init, drawn per position
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(x, self.kernel_size, padding=self.padding)  # (B, in*k*k, L)
        out = torch.einsum("bfl,lof->bol", cols, self.weight)
        return out.reshape(x.shape[0], self.out_channels, self.out_size, self.out_size) + self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, out_size={self.out_size}")


class ConvNet(nn.Module):
    """conv 1->C 3x3, ReLU, pool; conv C->C 3x3, ReLU, pool; fc C*7*7->H, ReLU, fc H->10."""

    def __init__(self, tied: bool = True, channels: int = 32, hidden: int = 128):
        super().__init__()

        def spatial(cin: int, cout: int, size: int) -> nn.Module:
            if tied:
                return nn.Conv2d(cin, cout, kernel_size=3, padding=1)
            return LocallyConnected2d(cin, cout, size, kernel_size=3, padding=1)

        self.conv1 = spatial(1, channels, 28)
        self.conv2 = spatial(channels, channels, 14)
        self.fc1 = nn.Linear(channels * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
