"""The SecAgg+ protocol (Bonawitz et al. 2017; Bell et al. 2020), both sides, for our own
Message-API round loop.

Flower 1.42 runs SecAgg+ only inside its legacy workflow (``SecAggPlusWorkflow`` and the
``secaggplus_mod`` client mod, which keep their state in Flower's context and speak
NumPyClient). The appliance's round loop and warm trainer are its own, so the same four
stages run here as four message exchanges of one round, with Flower's Shamir secret
sharing (``flwr.common.secure_aggregation.crypto.shamir``) and the ``cryptography``
package for the rest. Every site is every other site's neighbour: at hospital scale (a few
to a few dozen sites) the SecAgg+ graph degree is the number of sites anyway.

Participants are numbered 1..n by their position in the round's list (the coordinator
sends it); a Shamir share's index is that number.

Stages (what leaves each side):

1. *advertise*: each site makes two X25519 key pairs (``c`` to encrypt shares, ``s`` for
   pairwise masks) and a 32-byte self-mask seed ``b``; it sends both public keys.
2. *share*: given all public keys, it splits ``b`` and its ``s`` private key into
   ``threshold``-of-n Shamir shares and sends each other site its two shares, encrypted
   (AES-GCM under a key agreed from the ``c`` keys, bound to the pair and the round).
3. *mask*: given the ciphertexts addressed to it, it sends its integer vector plus
   ``PRG(b)`` plus, for each other site, ``+PRG(s_uv)`` (``u < v``) or ``-PRG(s_uv)``,
   modulo ``2**32``.
4. *unmask*: told which sites sent a masked vector (active) and which did not (dropped),
   it sends its share of ``b`` for each active site and of the ``s`` key for each dropped
   one, never both for one site, and answers this stage once.

The coordinator rebuilds each active site's ``b`` and each dropped site's ``s`` key from
``threshold`` shares, removes the masks and holds the sum: the pairwise masks of active
pairs cancel, those towards dropped sites are recomputed from their rebuilt keys. A
single masked vector is uniformly random to it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

__all__ = [
    "MODULUS",
    "SecAggClient",
    "SecAggError",
    "prg",
    "unmask_sum",
]

MODULUS: Final = 1 << 32


class SecAggError(Exception):
    """A protocol step that cannot go on (too few sites, a bad share, a reused stage)."""


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    return _kdf(private.exchange(X25519PublicKey.from_public_bytes(public)), info)


def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform residues modulo ``2**32`` from a 32-byte seed (ChaCha20 keystream:
    a cryptographic generator, unlike a seeded NumPy one)."""
    if len(seed) != 32:
        raise ValueError("a mask seed is 32 bytes")
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    raw = stream.update(b"\0" * (4 * size))
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)


def _pair_info(round_tag: bytes, u: int, v: int) -> bytes:
    a, b = sorted((u, v))
    return b"fedward-secagg-mask" + round_tag + struct.pack("<II", a, b)


def _pair_mask(seed: bytes, u: int, v: int, size: int) -> np.ndarray:
    """The pairwise mask that ``u`` adds for ``v`` (``-`` that of ``v`` for ``u``)."""
    mask = prg(seed, size)
    return mask if u < v else (MODULUS - mask) % MODULUS


@dataclass
class SecAggClient:
    """One site's side of one secure round. Keys never leave this object but as shares.

    Args:
        me: this site's number (1..n).
        n: the number of participants.
        threshold: the fewest survivors whose sum may be unmasked (2..n).
        round_tag: bytes naming the run and round (bound into every key and ciphertext).
    """

    me: int
    n: int
    threshold: int
    round_tag: bytes
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _received: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _own: tuple[bytes, bytes] | None = field(default=None, repr=False)
    _stage: str = "advertise"

    def __post_init__(self) -> None:
        if not (2 <= self.threshold <= self.n) or not (1 <= self.me <= self.n):
            raise SecAggError(f"bad secure round: site {self.me} of {self.n}, threshold "
                              f"{self.threshold}")

    def _step(self, expected: str, then: str) -> None:
        if self._stage != expected:
            raise SecAggError(f"secure aggregation stage out of order: {expected} asked "
                              f"after {self._stage}")
        self._stage = then

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 1: this site's two public keys (``c``, ``s``)."""
        self._step("advertise", "share")
        return _raw(self._c.public_key()), _raw(self._s.public_key())

    def share(self, public: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 2: the encrypted shares for each other advertised site.

        Raises:
            SecAggError: fewer than ``threshold`` sites advertised, or two used one key.
        """
        self._step("share", "mask")
        if len(public) < self.threshold or self.me not in public:
            raise SecAggError(f"only {len(public)} sites advertised keys; the secure round "
                              f"needs at least {self.threshold}")
        keys = [k for pair in public.values() for k in pair]
        if len(set(keys)) != len(keys):
            raise SecAggError("two advertised public keys are equal: refusing the round")
        self._public = dict(public)
        s_raw = self._s.private_bytes(serialization.Encoding.Raw,
                                      serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
        b_shares = create_shares(self._b, self.threshold, self.n)
        s_shares = create_shares(s_raw, self.threshold, self.n)
        out: dict[int, bytes] = {}
        for v in public:
            pair = (b_shares[v - 1], s_shares[v - 1])
            if v == self.me:
                self._own = pair
                continue
            key = _agree(self._c, public[v][0], b"fedward-secagg-share" + self.round_tag)
            plain = (struct.pack("<III", self.me, v, len(pair[0])) + pair[0] + pair[1])
            nonce = os.urandom(12)
            out[v] = nonce + AESGCM(key).encrypt(nonce, plain, self.round_tag)
        return out

    def mask(self, vector: np.ndarray, ciphertexts: Mapping[int, bytes]) -> np.ndarray:
        """Stage 3: ``vector`` (residues modulo 2**32) masked, after keeping the shares the
        other sites sent (``ciphertexts``: sender -> bytes).

        Raises:
            SecAggError: fewer than ``threshold`` sites (this one included) sent shares, or
                a ciphertext does not open.
        """
        self._step("mask", "unmask")
        for v, blob in ciphertexts.items():
            if v not in self._public or v == self.me:
                raise SecAggError(f"shares from site {v}, which did not advertise keys")
            key = _agree(self._c, self._public[v][0], b"fedward-secagg-share" + self.round_tag)
            try:
                plain = AESGCM(key).decrypt(blob[:12], blob[12:], self.round_tag)
            except Exception:
                raise SecAggError(f"the shares from site {v} do not decrypt") from None
            src, dst, nb = struct.unpack("<III", plain[:12])
            if (src, dst) != (v, self.me):
                raise SecAggError(f"the shares from site {v} name sites {src} -> {dst}")
            self._received[v] = (plain[12:12 + nb], plain[12 + nb:])
        if len(self._received) + 1 < self.threshold:
            raise SecAggError(f"shares from {len(self._received) + 1} sites; the secure round "
                              f"needs at least {self.threshold}")
        size = int(vector.size)
        out = (np.asarray(vector, dtype=np.int64).ravel() + prg(self._b, size)) % MODULUS
        for v in self._received:
            seed = _agree(self._s, self._public[v][1], _pair_info(self.round_tag, self.me, v))
            out = (out + _pair_mask(seed, self.me, v, size)) % MODULUS
        return np.asarray(out, dtype=np.int64)

    def unmask(self, active: list[int], dropped: list[int]
               ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Stage 4: (``b`` shares of the active sites, ``s`` shares of the dropped ones).

        Raises:
            SecAggError: fewer than ``threshold`` active sites, a site both active and
                dropped, or a site this one holds no shares of.
        """
        self._step("unmask", "done")
        if set(active) & set(dropped):
            raise SecAggError("a site is named both active and dropped: refusing to unmask")
        if len(set(active)) < self.threshold or self.me not in active:
            raise SecAggError(f"{len(set(active))} sites sent masked vectors; the sum is "
                              f"unmasked only for at least {self.threshold}")
        assert self._own is not None
        held = {**self._received, self.me: self._own}
        missing = [v for v in (*active, *dropped) if v not in held]
        if missing:
            raise SecAggError(f"no shares held for sites {missing}")
        return ({v: held[v][0] for v in active}, {v: held[v][1] for v in dropped})


def unmask_sum(*, masked: Mapping[int, np.ndarray], public: Mapping[int, tuple[bytes, bytes]],
               b_shares: Mapping[int, list[bytes]], s_shares: Mapping[int, list[bytes]],
               threshold: int, round_tag: bytes) -> np.ndarray:
    """The coordinator's last step: the sum (residues) of the active sites' vectors.

    Args:
        masked: active site -> its masked vector.
        public: every site that advertised -> its (``c``, ``s``) public keys.
        b_shares: active site -> the shares of its ``b`` that survivors sent.
        s_shares: dropped site (shares sent, no vector) -> the shares of its ``s`` key.
        threshold: shares needed per secret.
        round_tag: the round's tag.

    Raises:
        SecAggError: too few shares for a secret.
    """
    size = int(next(iter(masked.values())).size)
    total = np.zeros(size, dtype=np.int64)
    for vec in masked.values():
        total = (total + vec) % MODULUS
    for u, shares in b_shares.items():
        if len(shares) < threshold:
            raise SecAggError(f"{len(shares)} shares of site {u}'s mask; {threshold} needed")
        total = (total - prg(combine_shares(shares[:threshold]), size)) % MODULUS
    for v, shares in s_shares.items():
        if len(shares) < threshold:
            raise SecAggError(f"{len(shares)} shares of dropped site {v}'s key; {threshold} "
                              "needed")
        s_v = X25519PrivateKey.from_private_bytes(combine_shares(shares[:threshold]))
        for u in masked:
            # u added its pairwise mask for v; remove it (v's own vector never arrived).
            seed = _agree(s_v, public[u][1], _pair_info(round_tag, u, v))
            total = (total - _pair_mask(seed, u, v, size)) % MODULUS
    return total
