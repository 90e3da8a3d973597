"""The built-in model family for tabular data: fixed range scaling, then an MLP."""

from __future__ import annotations

import math

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


class _Imputer(nn.Module):
    """Replace a missing input (NaN) with its column's imputation value.

    The values are a non-persistent buffer, like the scaler's: part of the architecture,
    composed by the coordinator from the run's DP statistics (:mod:`fedward.preprocessing`),
    never trained and never sent in a round. A column without a value keeps NaN (a site
    never sends one: its data check refuses missing values that nothing imputes).
    """

    def __init__(self, fill: list[float | None]) -> None:
        super().__init__()
        values = [math.nan if v is None else float(v) for v in fill]
        self.register_buffer("fill", torch.tensor(values, dtype=torch.float32),
                             persistent=False)

    fill: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isnan(x), self.fill, x)


class TabularMLP(nn.Module):
    """MLP for tabular data: fixed range scaling, then hidden layers (ReLU), then the output.

    Args:
        low: each input column's low end of its reference range.
        high: each input column's high end.
        hidden: the hidden layers' sizes (one int: one layer); empty: no hidden layer, i.e.
            (multinomial) logistic regression on the scaled inputs.
        n_classes: output classes.
        fill: per input column, the value a missing input (NaN) is replaced with, or None
            (nothing imputed); None: no imputation step at all.
    """

    def __init__(self, low: list[float], high: list[float], hidden: int | list[int],
                 n_classes: int, fill: list[float | None] | None = None) -> None:
        super().__init__()
        if len(low) != len(high) or not low:
            raise ValueError(f"low and high need one value per input column (got {len(low)} "
                             f"and {len(high)})")
        if fill is not None and len(fill) != len(low):
            raise ValueError(f"fill needs one value per input column (got {len(fill)} for "
                             f"{len(low)} columns)")
        sizes = [hidden] if isinstance(hidden, int) else list(hidden)
        # Imputation first, then scaling: the fill values are in the column's own units.
        self.impute = _Imputer(fill) if fill is not None else None
        self.scale = _RangeScaler(low, high)
        layers: list[nn.Module] = []
        width = len(low)
        for size in sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impute is not None:
            x = self.impute(x)
        out: torch.Tensor = self.net(self.scale(x))
        return out
