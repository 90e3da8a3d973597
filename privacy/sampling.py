"""The numbers a site reserves in its ledger before a DP-SGD round.

:func:`sample_rate_for` and :func:`expected_steps` reproduce Opacus's arithmetic exactly
(the Poisson data loader :func:`privacy.training.train_dp` builds), so the ledger charges
what the accountant then records. Plain arithmetic: importing this module loads neither
torch nor Opacus, so a process that only plans or reserves (the site's tuning, the budget
checks) stays light.
"""

from __future__ import annotations

import math

__all__ = ["check_positive_int", "expected_steps", "sample_rate_for"]


def check_positive_int(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def _steps_per_epoch(n_examples: int, batch_size: int) -> int:
    # Opacus's path, step by step: a DataLoader without drop_last has ceil(n / batch)
    # batches; make_private turns it into a Poisson DPDataLoader with sample rate
    # 1 / len(loader), whose length is int(1 / sample_rate). That float round trip can lose
    # one batch (1 / (1 / 93) < 93), so it is reproduced here rather than simplified.
    batches = math.ceil(n_examples / batch_size)
    loader_rate = 1 / batches
    return int(1 / loader_rate)


def sample_rate_for(*, n_examples: int, batch_size: int) -> float:
    """The sampling rate Opacus's accountant records per step for this data and batch size.

    It is ``1 / steps_per_epoch`` where the steps per epoch are those of the Poisson data
    loader Opacus builds, which is close to but not ``batch_size / n_examples``. A batch
    size at or above ``n_examples`` gives 1.0.

    Args:
        n_examples: training examples at the site, >= 1.
        batch_size: expected batch size, >= 1.

    Returns:
        The sample rate, in (0, 1].

    Raises:
        ValueError: if an argument is not a positive integer.
    """
    check_positive_int("n_examples", n_examples)
    check_positive_int("batch_size", batch_size)
    return 1 / _steps_per_epoch(n_examples, batch_size)


def expected_steps(*, n_examples: int, batch_size: int, epochs: int) -> int:
    """DP-SGD steps :func:`train_dp` will take; reserve exactly this many in the ledger.

    Args:
        n_examples: training examples at the site, >= 1.
        batch_size: expected batch size, >= 1.
        epochs: local epochs this round, >= 1.

    Returns:
        ``epochs x`` the Poisson data loader's batches per epoch.

    Raises:
        ValueError: if an argument is not a positive integer.
    """
    check_positive_int("n_examples", n_examples)
    check_positive_int("batch_size", batch_size)
    check_positive_int("epochs", epochs)
    return epochs * _steps_per_epoch(n_examples, batch_size)
