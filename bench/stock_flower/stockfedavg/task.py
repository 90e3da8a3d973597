"""Model, data and the train/test loops, laid out as in Flower's PyTorch app template.

The model comes from Fedward's task registry (``fedward.tasks``, installed in the environment),
so the baseline trains exactly the appliance's model on the same data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedward.tasks import build_model


def get_model(task: str) -> torch.nn.Module:
    return build_model(task, seed=0)


def load_data(path: str, batch_size: int) -> DataLoader:
    """Load a site's partition: a CSV with a header, the features then the label last."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    x = torch.from_numpy(data[:, :-1])
    y = torch.from_numpy(data[:, -1]).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def train(net: torch.nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    net.train()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    running_loss, steps = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            steps += 1
    return running_loss / max(steps, 1)


def test(net: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    net.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = net(x)
            loss += criterion(out, y).item()
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    return loss / max(n, 1), correct / max(n, 1)
