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

from paramshare.kernels import conv_pool_relu


class _PositionwiseMatmul(torch.autograd.Function):
    """(L, B, F) x (L, O, F) -> (L, B, O): bmm(patches, weight^T), with a backward that
    makes the incoming gradient contiguous first. Autograd's own bmm backward receives it
    strided (it comes back through a permute) and then falls back to one small copy and
    matmul per position, 3x slower here."""

    @staticmethod
    def forward(ctx, patches: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(patches, weight)
        return torch.bmm(patches, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        patches, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_patches = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_patches, torch.bmm(grad.transpose(1, 2), patches)


class LocallyConnected2d(nn.Module):
    """Conv2d without weight sharing: weight (positions, out, in*k*k), bias (out, H, W).

    One batched matmul over positions, not a loop over them. The patches are gathered
    position-major, (positions, batch, in*k*k), from k*k shifted views of the padded input
    (the same (channel, row, col) order as F.unfold): bmm then runs on contiguous operands,
    and the backward of the gather is k*k slice-adds instead of a fold. 3-5x faster on CPU
    than unfold + einsum, same result.
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
        k, p, size = self.kernel_size, self.padding, self.out_size
        padded = F.pad(x, (p, p, p, p)).permute(2, 3, 0, 1)  # (H, W, B, C)
        patches = torch.stack([padded[i:i + size, j:j + size] for i in range(k) for j in range(k)], dim=-1)
        patches = patches.reshape(size * size, x.shape[0], -1)  # (L, B, C*k*k)
        out = _PositionwiseMatmul.apply(patches, self.weight)  # (L, B, out)
        out = out.reshape(size, size, x.shape[0], self.out_channels).permute(2, 3, 0, 1)
        return out.contiguous(memory_format=torch.channels_last) + self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, out_size={self.out_size}")


class ConvNet(nn.Module):
    """conv 1->C 3x3, ReLU, pool; conv C->C 3x3, ReLU, pool; fc C*7*7->H, ReLU, fc H->10.

    Speed choices that leave the function unchanged: pooling before the ReLU (max and ReLU
    commute, and ReLU then touches a quarter of the values), channels-last activations, for
    which oneDNN's convolution and CPU max-pooling are 1.5-2x faster, and the first layer's
    conv + pool + ReLU as one kernel on the CPU (paramshare.kernels), which never writes the
    full-size map.
    """

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
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        x = conv_pool_relu(self.conv1, x)
        x = conv_pool_relu(self.conv2, x)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
