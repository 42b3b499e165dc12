"""Sharing across models: parameter *tying* in the book's sense (Goodfellow et al. 7.9).

A classifier A (trained on the labelled images) and an autoencoder B (trained on every
training image) have encoders of the same shape. The tie is a penalty, not an identity:

    loss = CE(A, labelled) + MSE(B, all images) + strength * sum ||theta_A - theta_B||^2

over the paired encoder layers. The untied twin sets strength to 0: A and B then train
independently and A is a plain MLP classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PIXELS = 28 * 28


def encoder(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


class SoftTiedPair(nn.Module):
    uses_unlabelled = True

    def __init__(self, tied: bool = True, hidden: int = 256, strength: float = 1e-3):
        super().__init__()
        self.encoder_a = encoder(hidden)
        self.head = nn.Linear(hidden, 10)
        self.encoder_b = encoder(hidden)
        self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, PIXELS))
        self.strength = strength if tied else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder_a(x.flatten(1)))

    def tie_penalty(self) -> torch.Tensor:
        """strength * sum over the paired encoder tensors of ||theta_A - theta_B||^2."""
        if not self.strength:
            return self.head.weight.new_zeros(())
        gap = sum((a - b).pow(2).sum() for a, b in zip(self.encoder_a.parameters(), self.encoder_b.parameters()))
        return self.strength * gap

    def auxiliary_loss(self, unlabelled: torch.Tensor) -> torch.Tensor:
        flat = unlabelled.flatten(1)
        reconstruction = F.mse_loss(self.decoder(self.encoder_b(flat)), flat)
        return reconstruction + self.tie_penalty()
