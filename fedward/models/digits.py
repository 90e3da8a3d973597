"""The built-in model family for small grey images: a CNN for 8x8 digits."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN"]


class DigitsCNN(nn.Module):
    """Small CNN for grey images given as flat pixels from 0 to ``max_value`` (by default
    8x8 digits, 0 to 16).

    GroupNorm rather than BatchNorm: BatchNorm mixes samples in a batch, which per-sample
    DP-SGD cannot account for (Opacus rejects it).
    """

    def __init__(self, n_classes: int = 10, height: int = 8, width: int = 8,
                 max_value: float = 16.0) -> None:
        super().__init__()
        if height < 2 or width < 2 or not max_value > 0:
            raise ValueError("the image needs height and width of at least 2 and a "
                             "max_value above 0")
        self.height, self.width, self.max_value = height, width, float(max_value)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * (height // 2) * (width // 2), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = (x / self.max_value).reshape(-1, 1, self.height, self.width)
        out: torch.Tensor = self.head(torch.flatten(self.features(img), 1))
        return out
