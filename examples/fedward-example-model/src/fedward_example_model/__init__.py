"""An example Fedward model plugin: a tabular MLP with residual blocks.

Installed as an ordinary package, it registers the model family ``residual_mlp`` under the
entry-point group ``fedward.models``; a study names it with its parameters::

    model:
      family: plugin
      name: residual_mlp
      params: {n_features: 16, n_classes: 2, width: 32, blocks: 2}

``n_features`` is the study's encoded input width (one column per numeric, boolean or
ordinal feature, one per level of a categorical one, one per missing-value indicator) and
``n_classes`` its label's classes; the coordinator checks both against the spec when the
study is registered.

Every layer is one DP-SGD (Opacus) can train per sample: ``Linear`` and ``GroupNorm``
(normalisation within each example, so no statistics mix examples, unlike ``BatchNorm``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualBlock", "ResidualMLP"]
__version__ = "0.1.0"


class ResidualBlock(nn.Module):
    """``x + W2 relu(GroupNorm(W1 x))``: a residual block of constant width."""

    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.norm = nn.GroupNorm(groups, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.norm(self.fc1(x))))


class ResidualMLP(nn.Module):
    """Input layer, ``blocks`` residual blocks of ``width`` units, one score per class.

    Args:
        n_features: the study's encoded input width.
        n_classes: the label's classes.
        width: units of every hidden layer (a multiple of ``groups``).
        blocks: residual blocks (0 to 16).
        groups: GroupNorm groups.
    """

    def __init__(self, *, n_features: int, n_classes: int, width: int = 32, blocks: int = 2,
                 groups: int = 4) -> None:
        super().__init__()
        if n_features < 1 or n_classes < 2:
            raise ValueError(f"need n_features >= 1 and n_classes >= 2, got {n_features} "
                             f"and {n_classes}")
        if width < 1 or width % groups or not 0 <= blocks <= 16:
            raise ValueError(f"width ({width}) must be a positive multiple of groups "
                             f"({groups}) and blocks ({blocks}) between 0 and 16")
        self.inp = nn.Linear(n_features, width)
        self.inp_norm = nn.GroupNorm(groups, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, groups) for _ in range(blocks)))
        self.out = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp_norm(self.inp(x)))
        return self.out(self.blocks(h))
