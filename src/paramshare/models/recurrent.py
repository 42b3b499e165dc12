"""Sharing across time: a row-by-row GRU whose one cell serves every step, against 28 cells.

The image is read as a sequence of 28 rows of 28 pixels; the class is read out from the
last hidden state. The untied twin has the same topology with a fresh cell per step.
"""
from __future__ import annotations

import torch
from torch import nn

ROWS = COLS = 28


class RowGRU(nn.Module):
    def __init__(self, tied: bool = True, hidden: int = 128):
        super().__init__()
        self.hidden = hidden
        cell = nn.GRUCell(COLS, hidden)
        self.cells = nn.ModuleList([cell] * ROWS if tied else [nn.GRUCell(COLS, hidden) for _ in range(ROWS)])
        self.readout = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], ROWS, COLS)
        h = rows.new_zeros(x.shape[0], self.hidden)
        for t, cell in enumerate(self.cells):
            h = cell(rows[:, t], h)
        return self.readout(h)
