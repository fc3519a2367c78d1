"""Balanced client participation: the clients sampled least so far train next.

Flower's strategies draw each round's clients uniformly and afresh, so over R rounds of K of
N clients each client takes part R*K/N times only on average: in 20 rounds of 2 of 10
clients, some trained twice and others six times (AG News, seed 1). With `client-sampling =
balanced` a round takes the K connected clients with the fewest past rounds, ties broken by
a per-round seeded shuffle: while the same N clients stay connected and K divides N, every
client trains exactly once in each block of N/K rounds, like sampling without replacement
across rounds (cyclic participation; Cho et al. 2023, "On the Convergence of Federated
Averaging with Cyclic Client Participation").

The counts come from the round ledger (who was sampled in each round), which every
checkpoint carries, so a resumed run samples as the uninterrupted one would. A client that
joins late starts at zero and is preferred until it has caught up; one that refused or failed
a round still counts that round, so a client out of privacy budget is not asked again first.
The strategy still decides how many clients a round takes and what they are sent; this
module only decides who.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from flwr.app import Message


def participation(rounds: list[dict]) -> Counter:
    """Client id -> rounds it was sampled in, from the round ledger."""
    return Counter(client for entry in rounds for client in entry["sampled"])


def least_sampled(nodes: list[int], clients: dict[int, str], counts: Counter, k: int, seed: int) -> list[int]:
    """The `k` of `nodes` whose clients were sampled least, ties broken by a shuffle seeded with `seed`."""
    if not 0 <= k <= len(nodes):
        raise ValueError(f"balanced sampling: expected 0..{len(nodes)} clients to choose, got {k}")
    shuffled = [nodes[i] for i in np.random.default_rng(seed).permutation(len(nodes))]
    ranked = sorted(shuffled, key=lambda n: counts.get(clients.get(n, ""), 0))  # stable: the shuffle breaks ties
    return ranked[:k]


def send_to(messages: list[Message], nodes: list[int]) -> list[Message]:
    """The strategy's messages, re-addressed to `nodes` instead of the ones it drew.

    Flower's strategies send every sampled node the same content; a strategy that addressed
    different content to different nodes cannot be re-addressed, and is refused.
    """
    if len(messages) != len(nodes):
        raise ValueError(f"balanced sampling: expected one node per message ({len(messages)}), got {len(nodes)}")
    if any(m.content is not messages[0].content for m in messages):
        raise ValueError("client-sampling = balanced: expected the strategy to send every sampled client the same "
                         "content, got per-client messages; use client-sampling = random with this strategy")
    for message, node in zip(messages, nodes):
        message.metadata.dst_node_id = node  # not yet sent: the SuperLink has given it no id
    return messages
