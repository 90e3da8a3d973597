"""Secure aggregation with distributed DP: the protocol pieces, the noise and the charge."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedward.flower.secagg import MODULUS, SecAggClient, SecAggError, unmask_sum
from fedward.run_config import RunConfig, RunPlan, RunRequest
from privacy.accounting import compose_mechanisms
from privacy.distributed import (
    DistributedPlan,
    dequantise,
    from_field,
    quantise,
    skellam,
    skellam_rdp,
    to_field,
)
from privacy.mechanisms import DistributedSkellam, decode_mechanism

TAG = b"run-1-round-1"


def _protocol(vectors: dict[int, np.ndarray], *, threshold: int, drop_after_share: set[int]
              ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Run the four stages among len(vectors) sites; sites in drop_after_share vanish
    after stage 2. Returns the unmasked sum and the masked vectors the server held."""
    n = len(vectors)
    clients = {i: SecAggClient(me=i, n=n, threshold=threshold, round_tag=TAG)
               for i in vectors}
    public = {i: c.advertise() for i, c in clients.items()}
    sent = {i: c.share(public) for i, c in clients.items()}
    active = [i for i in clients if i not in drop_after_share]
    masked = {}
    for u in active:
        inbox = {v: sent[v][u] for v in sent if v != u}
        masked[u] = clients[u].mask(to_field(vectors[u]), inbox)
    dropped = sorted(drop_after_share)
    b_shares: dict[int, list[bytes]] = {u: [] for u in active}
    s_shares: dict[int, list[bytes]] = {v: [] for v in dropped}
    for u in active:
        b, s = clients[u].unmask(active, dropped)
        for v, share in b.items():
            b_shares[v].append(share)
        for v, share in s.items():
            s_shares[v].append(share)
    total = unmask_sum(masked=masked, public=public, b_shares=b_shares, s_shares=s_shares,
                       threshold=threshold, round_tag=TAG)
    return from_field(total), masked


def test_masks_cancel_in_the_sum_and_hide_each_vector() -> None:
    rng = np.random.default_rng(1)
    vectors = {i: rng.integers(-5000, 5000, size=257) for i in (1, 2, 3)}
    total, masked = _protocol(vectors, threshold=2, drop_after_share=set())
    assert np.array_equal(total, sum(vectors.values()))
    for u, vec in masked.items():
        # What the server holds of one site is unrelated to that site's vector.
        assert not np.array_equal(from_field(vec), vectors[u])
        assert abs(np.corrcoef(from_field(vec).astype(float), vectors[u])[0, 1]) < 0.3


def test_a_dropped_sites_mask_is_rebuilt_from_shares() -> None:
    rng = np.random.default_rng(2)
    vectors = {i: rng.integers(-5000, 5000, size=100) for i in (1, 2, 3, 4)}
    total, masked = _protocol(vectors, threshold=2, drop_after_share={3})
    assert set(masked) == {1, 2, 4}
    assert np.array_equal(total, vectors[1] + vectors[2] + vectors[4])


def test_fewer_survivors_than_the_threshold_are_refused() -> None:
    clients = {i: SecAggClient(me=i, n=3, threshold=3, round_tag=TAG) for i in (1, 2, 3)}
    public = {i: c.advertise() for i, c in clients.items()}
    sent = {i: c.share(public) for i, c in clients.items()}
    clients[1].mask(to_field(np.zeros(4, dtype=np.int64)), {v: sent[v][1] for v in (2, 3)})
    with pytest.raises(SecAggError, match="at least 3"):
        clients[1].unmask([1, 2], [3])
    with pytest.raises(SecAggError, match="out of order"):
        clients[1].unmask([1, 2, 3], [])   # one unmask answer per round, never two
    lone = SecAggClient(me=1, n=3, threshold=2, round_tag=TAG)
    with pytest.raises(SecAggError, match="at least 2"):
        lone.share({1: lone.advertise()})


def test_a_site_never_gives_both_secrets_of_one_site() -> None:
    clients = {i: SecAggClient(me=i, n=3, threshold=2, round_tag=TAG) for i in (1, 2, 3)}
    public = {i: c.advertise() for i, c in clients.items()}
    sent = {i: c.share(public) for i, c in clients.items()}
    clients[1].mask(to_field(np.zeros(4, dtype=np.int64)), {v: sent[v][1] for v in (2, 3)})
    with pytest.raises(SecAggError, match="both active and dropped"):
        clients[1].unmask([1, 2, 3], [3])


def test_quantise_error_is_bounded_and_unbiased() -> None:
    rng = np.random.default_rng(3)
    plan = DistributedPlan(clip=1.0, dim=1000, threshold=2, noise_multiplier=1.0)
    update = rng.normal(size=1000) * 0.01   # norm about 0.3: not clipped
    q = quantise(update, clip=plan.clip, scale=plan.scale, rng=rng)
    back = dequantise(q, scale=plan.scale)
    assert np.max(np.abs(back - update)) < 1.0 / plan.scale
    # The rounded vector stays inside the ball the sensitivity assumes.
    assert np.linalg.norm(q) <= plan.l2 / 2
    big = rng.normal(size=1000) * 10   # clipped to norm 1
    qb = dequantise(quantise(big, clip=1.0, scale=plan.scale, rng=rng), scale=plan.scale)
    assert np.linalg.norm(qb) == pytest.approx(1.0, abs=math.sqrt(1000) / plan.scale)
    means = np.mean([dequantise(quantise(update, clip=1.0, scale=plan.scale, rng=rng),
                                scale=plan.scale) for _ in range(200)], axis=0)
    assert np.max(np.abs(means - update)) < 0.3 / plan.scale


def test_noise_of_the_sum_matches_the_plan_at_the_threshold_and_above() -> None:
    rng = np.random.default_rng(4)
    plan = DistributedPlan(clip=1.0, dim=2000, threshold=3, noise_multiplier=0.8)
    size = 20000
    for sites in (3, 5):
        total = sum(skellam(plan.share_variance, size, rng) for _ in range(sites))
        expected = plan.share_variance * sites
        assert np.var(total) == pytest.approx(expected, rel=0.05)
        assert abs(float(np.mean(total))) < 4 * math.sqrt(expected / size)
    # The threshold's sum carries exactly the planned variance.
    assert plan.share_variance * plan.threshold == pytest.approx(plan.variance)


def test_the_field_holds_the_signed_sum() -> None:
    vec = np.array([-(2 ** 31), -1, 0, 1, 2 ** 31 - 1], dtype=np.int64)
    assert np.array_equal(from_field(to_field(vec)), vec)
    assert int(to_field(vec).max()) < MODULUS


def _independent_epsilon(m: DistributedSkellam, rounds: int, delta: float) -> float:
    """Skellam RDP (Agarwal et al., Theorem 3.5, with its exact min term) composed over
    rounds and converted to (epsilon, delta) as Canonne, Kamath and Steinke (2020) do."""
    best = math.inf
    for alpha in np.concatenate([np.linspace(1.01, 10, 900), np.linspace(10, 512, 2000)]):
        r = rounds * skellam_rdp(float(alpha), variance=m.variance, l1=m.l1_sensitivity,
                                 l2=m.l2_sensitivity)
        eps = r + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


@pytest.mark.parametrize(("z", "rounds"), [(0.9, 5), (3.0, 20), (10.0, 3)])
def test_the_charge_matches_an_independent_recomputation(z: float, rounds: int) -> None:
    plan = DistributedPlan(clip=1.0, dim=2114, threshold=2, noise_multiplier=z)
    mech = DistributedSkellam(plan.variance, plan.l2, plan.l1, 1)
    assert decode_mechanism(mech.to_dict()) == mech
    figure = compose_mechanisms([mech] * rounds, delta=1e-5)
    assert figure.accountant == "rdp"
    independent = _independent_epsilon(mech, rounds, 1e-5)
    # The accountant's bound may only be the larger, and by under 1%.
    assert independent <= figure.epsilon * (1 + 1e-9)
    assert figure.epsilon == pytest.approx(independent, rel=0.01)


@pytest.mark.parametrize(("extra", "why"), [
    ({"aggregation": "median"}, "only fedavg"),
    ({"aggregation": "fedadam"}, "only fedavg"),
    ({"max_update_norm": 2.0}, "never sees one site's update"),
])
def test_checks_that_need_one_update_are_refused_at_launch(extra: dict[str, object],
                                                          why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RunRequest.model_validate({"project": "p", "task": "breast_cancer_mlp",
                                   "epsilon": 3.0, "secure_aggregation": True, **extra})


def test_a_threshold_above_the_runs_sites_is_refused() -> None:
    def config(sites: list[str], threshold: int | None = None) -> RunConfig:
        return RunConfig(epsilon=3.0, lr=0.1, batch_size=32, secure_aggregation=True,
                         sites=sites, secagg_threshold=threshold)

    with pytest.raises(ValueError, match="at least 3 sites"):
        config(["a-1", "b-1"], 3)
    with pytest.raises(ValueError, match="at least 2 sites"):
        config(["a-1"])
    assert config(["a-1", "b-1"]).secagg_threshold_or_default() == 2
    with pytest.raises(ValueError, match="secure_aggregation is off"):
        RunRequest(project="p", task="breast_cancer_mlp", epsilon=3.0, secagg_threshold=2)


def test_the_lineage_says_which_aggregation_mode_the_run_used() -> None:
    from coordinator.release_lineage import aggregation_mode

    assert aggregation_mode({"aggregation": "median"})["mode"] == "plain"
    secure = aggregation_mode({"secure_aggregation": True, "min_sites": 3,
                               "secagg_clip": 0.5, "aggregation": "fedavg"})
    assert (secure["mode"], secure["threshold"], secure["update_clip"]) == ("secure", 3, 0.5)


def test_the_threshold_is_stored_resolved_and_the_plan_loads() -> None:
    stored = RunConfig(epsilon=3.0, lr=0.1, batch_size=32, secure_aggregation=True,
                       sites=["a-1", "b-1", "c-1"], min_sites=3)
    assert stored.secagg_threshold == 3
    plan = RunPlan.model_validate({**stored.model_dump(), "run_id": 1, "project": "p",
                                   "task": "breast_cancer_mlp"})
    assert plan.task_config(1, train=True)["secagg-threshold"] == 3
