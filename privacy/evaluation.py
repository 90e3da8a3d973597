"""Evaluation of a trained model at a site: loss, accuracy and ROC AUC on a labelled set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from privacy.labelled_data import labelled_tensors
from privacy.roc_auc import class_auc

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on a labelled set.

    Attributes:
        loss: mean cross-entropy.
        accuracy: share of correct argmax predictions.
        auc: ROC AUC: binary, the probability of class 1; multiclass, the one-vs-rest
            macro average over the classes present. ``nan`` when the labels hold a single
            class, where AUC is undefined (a small site's held-out split can be like that).
        n: number of examples.
    """

    loss: float
    accuracy: float
    auc: float
    n: int


def evaluate(*, model: nn.Module, features: np.ndarray, labels: np.ndarray) -> EvalResult:
    """Loss, accuracy and AUC of ``model`` on a labelled set (no gradients, eval mode).

    Args:
        model: a plain classification model producing logits.
        features: features, examples x columns.
        labels: class numbers, one per example.

    Returns:
        The :class:`EvalResult`; its ``auc`` is ``nan`` when only one class is present.

    Raises:
        ValueError: for empty or malformed data, or labels outside the model's classes.
    """
    x, y = labelled_tensors(features, labels)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        model.train(was_training)
    n_classes = logits.shape[1]
    if int(y.max()) >= n_classes:
        raise ValueError(f"labels go up to {int(y.max())} but the model has {n_classes} classes")
    loss = float(nn.functional.cross_entropy(logits, y))
    probs = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    y_np = y.numpy()
    accuracy = float(np.mean(probs.argmax(axis=1) == y_np))
    return EvalResult(loss=loss, accuracy=accuracy, auc=class_auc(y_np, probs), n=len(y_np))
