"""The built-in model family for small grey images: a CNN for 8x8 digits."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN"]


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 grey images given as 64 flat pixels (0 to 16).

    GroupNorm rather than BatchNorm: BatchNorm mixes samples in a batch, which per-sample
    DP-SGD cannot account for (Opacus rejects it).
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 4 * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = (x / 16.0).reshape(-1, 1, 8, 8)
        out: torch.Tensor = self.head(torch.flatten(self.features(img), 1))
        return out
