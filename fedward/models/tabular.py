"""The built-in model family for tabular data: fixed range scaling, then an MLP."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TabularMLP"]


class _RangeScaler(nn.Module):
    """Scale features to about [0, 1] with fixed, published reference ranges.

    The constants are non-persistent buffers: they are part of the architecture, not of the
    trained parameters, so they never travel in a round and cannot be altered by a site.
    """

    def __init__(self, low: list[float], high: list[float]) -> None:
        super().__init__()
        lo = torch.tensor(low, dtype=torch.float32)
        span = torch.tensor(high, dtype=torch.float32) - lo
        # A constant column would divide by zero: fall back to a span of 1.
        span = torch.where(span > 0, span, torch.ones_like(span))
        self.register_buffer("low", lo, persistent=False)
        self.register_buffer("span", span, persistent=False)

    low: torch.Tensor
    span: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.low) / self.span


class TabularMLP(nn.Module):
    """MLP for tabular data: fixed range scaling, then hidden layers (ReLU), then the output.

    Args:
        low: each input column's low end of its reference range.
        high: each input column's high end.
        hidden: the hidden layers' sizes (one int: one layer); empty: no hidden layer, i.e.
            (multinomial) logistic regression on the scaled inputs.
        n_classes: output classes.
    """

    def __init__(self, low: list[float], high: list[float], hidden: int | list[int],
                 n_classes: int) -> None:
        super().__init__()
        if len(low) != len(high) or not low:
            raise ValueError(f"low and high need one value per input column (got {len(low)} "
                             f"and {len(high)})")
        sizes = [hidden] if isinstance(hidden, int) else list(hidden)
        self.scale = _RangeScaler(low, high)
        layers: list[nn.Module] = []
        width = len(low)
        for size in sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(self.scale(x))
        return out
