"""The seed of one round's DP noise and Poisson sampling at a site (:func:`round_noise_seed`).

Fresh operating-system entropy mixed with a secret only the site holds, never stored: the
coordinator cannot choose it and nobody can regenerate a round's noise afterwards.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["round_noise_seed"]


def round_noise_seed(*, secret: bytes, run_id: str, round_number: int, entropy: bytes) -> int:
    """The 63-bit seed of one round's DP noise and Poisson sampling at a site.

    HMAC-SHA256 under the site's noise secret of the run, the round and ``entropy``, which
    the trainer draws fresh from the operating system (``secrets.token_bytes(32)``) for
    every round and never stores. The seed is therefore unknown to the coordinator (nothing
    it chose decides it) and to anyone holding a copy of the site's secret (a backup, a
    stolen disk image): noise that could be regenerated could be subtracted from the
    update. The secret still keeps the seed out of reach should the operating system's
    entropy ever be weak (a cloned virtual machine). The price, chosen on purpose: a round
    cannot be re-trained to the same result; a repeated round is answered from its stored
    reply instead (``WarmTrainer``).

    The seed drives PyTorch's generator (not a cryptographic one; Opacus's secure_mode,
    which would draw every sample from a CSPRNG, needs torchcsprng, unmaintained since
    2021). An observer sees only noised sums of clipped gradients, never the generator's
    raw output.

    Args:
        secret: the site's noise secret (``site_agent.keys.ensure_noise_secret``); may be
            empty (tools that embed the trainer), the entropy then decides alone.
        run_id: the run.
        round_number: the round.
        entropy: at least 16 fresh random bytes (fixed bytes only in benchmarks that must
            repeat a run).

    Raises:
        ValueError: if ``entropy`` is shorter than 16 bytes.
    """
    if len(entropy) < 16:
        raise ValueError(f"a round's noise seed needs at least 16 bytes of entropy, got "
                         f"{len(entropy)}")
    message = f"{run_id}/{round_number}/".encode() + entropy
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1
