"""The example plugin's own tests: shape, DP-SGD trainability, its entry point."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
from fedward_example_model import ResidualMLP
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset


def test_it_scores_each_row_once_per_class() -> None:
    model = ResidualMLP(n_features=7, n_classes=3, width=16, blocks=3)
    assert model(torch.zeros(5, 7)).shape == (5, 3)
    assert len(model.blocks) == 3


def test_bad_sizes_are_refused_saying_which() -> None:
    with pytest.raises(ValueError, match="width \\(10\\) must be a positive multiple"):
        ResidualMLP(n_features=3, n_classes=2, width=10, groups=4)
    with pytest.raises(ValueError, match="n_classes >= 2"):
        ResidualMLP(n_features=3, n_classes=1)


def test_opacus_accepts_it_and_one_dp_sgd_step_moves_every_layer() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(n_features=4, n_classes=2, width=8, blocks=1)
    assert ModuleValidator.validate(model, strict=False) == []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=16),
        noise_multiplier=1.0, max_grad_norm=1.0)
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(private(x), y).backward()
        optimizer.step()
        break
    after = model.state_dict()
    assert all(not after[k].equal(before[k]) for k in before)
    assert engine.get_epsilon(1e-5) > 0


def test_its_entry_point_names_the_model_family() -> None:
    try:
        dist = metadata.distribution("fedward-example-model")
    except metadata.PackageNotFoundError:
        pytest.skip("the package is imported from its source folder, not installed")
    (ep,) = [e for e in dist.entry_points if e.group == "fedward.models"]
    assert (ep.name, ep.load()) == ("residual_mlp", ResidualMLP)
