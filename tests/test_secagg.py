"""Secure aggregation (common/secagg.py): the protocol's promises, checked on its own code.

RELIABILITY secure aggregation: S1 exact sum (the unmasked aggregate equals the plain sum of the
surviving clients' vectors, bit for bit, for every dropout pattern the threshold tolerates; below
it the round is refused), S2 hidden inputs (a masked vector is uniform and independent of its
input; masks never repeat across rounds or runs). Bad inputs: a tampered share, a server asking
for both shares of one client, a repeated or skipped stage, too few parties.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from common.secagg import (
    MODULUS, SecAggError, ServerRound, client_keys, client_mask, client_shares, client_unmask, from_field, mask_words,
    threshold_for, to_field,
)
from tests.reliability import count

NODES = [101, 202, 303, 404, 505]


def run_protocol(vectors: dict[int, np.ndarray], *, threshold: int, drop_before_shares=(), drop_before_mask=(),
                 drop_before_unmask=(), server_round: int = 1, run: str = "run"):
    """The four stages in memory; returns (server's unmasked sum or the SecAggError, masked vectors)."""
    nodes = sorted(vectors)
    length = len(next(iter(vectors.values())))
    server = ServerRound(run=run, server_round=server_round, sampled=nodes, threshold=threshold, length=length)
    clients = {n: client_keys(node=n, run=run, server_round=server_round, threshold=threshold, clients=len(nodes))
               for n in nodes}
    for n, c in clients.items():
        server.add_keys(n, c.mask_public, c.seal_public)
    sealed = {n: client_shares(clients[n], dict(server.keys)) for n in nodes if n not in drop_before_shares}
    inbox = server.route(sealed)
    masked = {}
    for n in sealed:
        if n in drop_before_mask:
            continue
        masked[n] = client_mask(clients[n], inbox[n], to_field(vectors[n]))
        server.add_masked(n, masked[n])
    replies = {}
    for n in server.masked:
        if n in drop_before_unmask:
            continue
        try:
            replies[n] = client_unmask(clients[n], active=server.masked, dropped=server.dropped())
        except SecAggError:  # a client refuses to unmask fewer than `threshold` vectors
            pass
    try:
        return from_field(server.unmask(replies)), masked
    except SecAggError as err:
        return err, masked


def random_vectors(rng, nodes=NODES, length=1000, bound=2**28):
    return {n: rng.integers(-bound, bound, length) for n in nodes}


def test_the_unmasked_sum_is_the_plain_sum_bit_for_bit_for_every_dropout_pattern_the_threshold_allows():
    rng = np.random.default_rng(0)
    threshold = threshold_for(len(NODES), 2)  # 5 clients, up to 2 drop-outs: 3 shares rebuild a secret
    vectors = random_vectors(rng)
    vectors[NODES[0]][:3] = [-(MODULUS // 8), MODULUS // 8 - 1, 0]  # signed extremes
    patterns = 0
    for stage in ("shares", "mask", "unmask"):
        for k in range(0, 3):
            for dropped in itertools.combinations(NODES, k):
                survivors = [n for n in NODES if stage == "unmask" or n not in dropped]
                total, _ = run_protocol(vectors, threshold=threshold, **{f"drop_before_{stage}": dropped})
                expected = from_field(to_field(sum(vectors[n] for n in survivors)))
                assert isinstance(total, np.ndarray), (stage, dropped, total)
                assert np.array_equal(total, expected), (stage, dropped)
                patterns += 1
    assert patterns == 3 * (1 + 5 + 10)
    count("invariant_checks_passed", "S1 exact secure sum under every tolerated dropout pattern")


@pytest.mark.parametrize("stage", ["mask", "unmask"])
def test_below_the_threshold_nothing_is_unmasked(stage):
    vectors = random_vectors(np.random.default_rng(1))
    total, _ = run_protocol(vectors, threshold=3, **{f"drop_before_{stage}": NODES[:3]})
    assert isinstance(total, SecAggError)
    assert "expected" in str(total) and "3" in str(total)
    count("bad_inputs_rejected", f"secure round below the threshold at {stage}")


def test_a_majority_threshold_is_required():
    assert threshold_for(10, 1) == 9 and threshold_for(3, 1) == 2 and threshold_for(2, 0) == 2
    for clients, dropouts in ((2, 1), (4, 2), (10, 5), (1, 0)):
        with pytest.raises(SecAggError, match="more than half"):
            threshold_for(clients, dropouts)
    with pytest.raises(SecAggError, match="threshold above half"):
        client_keys(node=1, run="r", server_round=1, threshold=2, clients=4)


def test_a_masked_vector_is_uniform_and_independent_of_its_input():
    """S2: over many rounds, one client's masked coordinate is uniform on Z_M whatever the input, and
    uncorrelated with it; the input and the masked vector agree no more often than chance."""
    rng = np.random.default_rng(2)
    length, trials = 4000, 8
    inputs, outputs = [], []
    for trial in range(trials):
        vectors = random_vectors(rng, nodes=NODES[:3], length=length, bound=2**20)
        vectors[NODES[0]] = np.where(np.arange(length) % 2 == 0, 0, 2**20 - 1)  # a very non-uniform input
        _, masked = run_protocol(vectors, threshold=2, server_round=trial + 1)
        inputs.append(vectors[NODES[0]])
        outputs.append(masked[NODES[0]])
    x, y = np.concatenate(inputs), np.concatenate(outputs)
    counts, _ = np.histogram(y, bins=16, range=(0, MODULUS))
    assert stats.chisquare(counts).pvalue > 1e-4  # uniform on Z_M
    r = np.corrcoef(x.astype(float), y.astype(float))[0, 1]
    assert abs(r) < 4 / np.sqrt(len(x)), r
    assert np.mean(x == y) < 1e-3
    for parity in (0, 1):  # the masked value's distribution does not depend on which input it hid
        a, b = y[x == 0], y[x == 2**20 - 1]
        assert stats.ks_2samp(a[parity::2] / MODULUS, b[parity::2] / MODULUS).pvalue > 1e-4
    count("invariant_checks_passed", "S2 masked vector uniform and independent of its input")


def test_masks_never_repeat_across_rounds_or_runs():
    """The same input in two rounds (or two runs) gives masked vectors whose difference is uniform, not
    the zero difference a reused mask would reveal; the mask generator binds its context."""
    vectors = {n: np.full(2000, 7, dtype=np.int64) for n in NODES[:3]}
    _, first = run_protocol(vectors, threshold=2, server_round=1)
    _, second = run_protocol(vectors, threshold=2, server_round=2)
    _, other_run = run_protocol(vectors, threshold=2, server_round=1, run="another run")
    for again in (second, other_run):
        diff = np.mod(first[NODES[0]] - again[NODES[0]], MODULUS)
        assert np.count_nonzero(diff == 0) <= 2
        counts, _ = np.histogram(diff, bins=8, range=(0, MODULUS))
        assert stats.chisquare(counts).pvalue > 1e-4
    seed = bytes(32)
    assert np.array_equal(mask_words(seed, 50, context=b"a"), mask_words(seed, 50, context=b"a"))
    assert not np.array_equal(mask_words(seed, 50, context=b"a"), mask_words(seed, 50, context=b"b"))
    count("invariant_checks_passed", "S2 masks differ across rounds and runs")


def _three_clients(threshold=2):
    nodes = NODES[:3]
    clients = {n: client_keys(node=n, run="r", server_round=1, threshold=threshold, clients=3) for n in nodes}
    keys = {n: (c.mask_public, c.seal_public) for n, c in clients.items()}
    return nodes, clients, keys


def test_a_client_never_reveals_both_shares_of_one_client_and_unmasks_once():
    nodes, clients, keys = _three_clients()
    sealed = {n: client_shares(clients[n], keys) for n in nodes}
    inbox = {n: [(src, c) for src, items in sealed.items() for dst, c in items if dst == n] for n in nodes}
    for n in nodes:
        client_mask(clients[n], inbox[n], np.zeros(10, dtype=np.int64))
    with pytest.raises(SecAggError, match="both active and dropped"):
        client_unmask(clients[nodes[0]], active=nodes, dropped=[nodes[1]])
    with pytest.raises(SecAggError, match="at least 2 active"):
        client_unmask(clients[nodes[1]], active=[nodes[1]], dropped=nodes[2:])
    client_unmask(clients[nodes[2]], active=nodes, dropped=[])
    with pytest.raises(SecAggError, match="expected stage"):  # a second request for the same round
        client_unmask(clients[nodes[2]], active=nodes[1:], dropped=[nodes[0]])
    count("bad_inputs_rejected", "server asking one client for both shares of another")
    count("bad_inputs_rejected", "a second unmask request in one round")


def test_tampered_or_misaddressed_shares_and_out_of_order_stages_are_refused():
    nodes, clients, keys = _three_clients()
    with pytest.raises(SecAggError, match="expected stage 'masked'"):  # stage 3 before stage 2
        client_mask(clients[nodes[0]], [], np.zeros(4, dtype=np.int64))
    nodes, clients, keys = _three_clients()
    with pytest.raises(SecAggError, match="own keys"):
        client_shares(clients[nodes[0]], {**keys, nodes[0]: keys[nodes[1]]})
    nodes, clients, keys = _three_clients()
    sealed = {n: client_shares(clients[n], keys) for n in nodes}
    to_first = [(src, c) for src, items in sealed.items() for dst, c in items if dst == nodes[0]]
    tampered = [(src, c[:-4] + b"AAAA") for src, c in to_first]
    with pytest.raises(SecAggError, match="does not open"):
        client_mask(clients[nodes[0]], tampered, np.zeros(4, dtype=np.int64))
    to_second = [(src, c) for src, items in sealed.items() for dst, c in items if dst == nodes[1]]
    with pytest.raises(SecAggError, match="does not open|sealed from"):  # meant for another client
        client_mask(clients[nodes[2]], [(nodes[0], to_second[0][1])], np.zeros(4, dtype=np.int64))
    count("bad_inputs_rejected", "a tampered secure-aggregation share")
    count("bad_inputs_rejected", "a share addressed to another client")


def test_the_server_refuses_vectors_of_the_wrong_shape_dtype_or_range():
    server = ServerRound(run="r", server_round=1, sampled=[1, 2], threshold=2, length=5)
    for bad in (np.zeros(4, dtype=np.int64), np.zeros(5, dtype=np.float64), np.full(5, MODULUS, dtype=np.int64),
                np.full(5, -1, dtype=np.int64)):
        with pytest.raises(SecAggError, match="expected 5 int64"):
            server.add_masked(1, bad)
    assert server.masked == []
    count("bad_inputs_rejected", "a masked vector of the wrong shape, dtype or range")


def test_a_server_that_calls_a_client_dropped_after_its_vector_arrived_still_learns_nothing():
    """SecAgg's double mask: the server that gets a client's mask key (by naming it dropped) removes
    its pairwise masks, and what remains, input plus self-mask, is fresh in every run of a round:
    the same input in two runs of round 1 leaves uniform, unrelated remainders."""
    from common.secagg import _context, _pair_seed

    x = np.full(3000, 12345, dtype=np.int64)
    remainders = []
    for _ in range(2):
        nodes, clients, keys = _three_clients()
        sealed = {n: client_shares(clients[n], keys) for n in nodes}
        inbox = {n: [(src, c) for src, items in sealed.items() for dst, c in items if dst == n] for n in nodes}
        target, others = nodes[0], nodes[1:]
        y = client_mask(clients[target], inbox[target], x)
        for n in others:
            client_mask(clients[n], inbox[n], np.zeros_like(x))
        # The two others, told `target` dropped, hand over their shares of its mask key.
        from common.flower import join_shares

        shares = [dict(client_unmask(clients[n], active=others, dropped=[target]))[target] for n in others]
        mask_key = join_shares(shares)
        assert mask_key == clients[target].mask_key or clients[target].mask_key == b""  # (wiped after unmasking)
        remainder = y.copy()
        for n in others:
            pair = mask_words(_pair_seed(mask_key, keys[n][0]), len(x), context=_context("r", 1, "pair", *sorted((target, n))))
            remainder -= pair if target > n else -pair
        remainders.append(np.mod(remainder, MODULUS))
    diff = np.mod(remainders[0] - remainders[1], MODULUS)
    assert np.count_nonzero(diff == 0) <= 2 and np.count_nonzero(remainders[0] == x) <= 2
    counts, _ = np.histogram(diff, bins=8, range=(0, MODULUS))
    assert stats.chisquare(counts).pvalue > 1e-4
    count("invariant_checks_passed", "S2 a client wrongly called dropped stays hidden by its fresh self-mask")
