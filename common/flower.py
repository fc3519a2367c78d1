"""Every reach of fedtune into Flower beyond its app API (messages, records, the Grid), in one place.

Flower's strategies keep their round-to-round state in attributes and cannot be checkpointed;
its client-level DP wrappers fix the number of sampled clients when they are built; its node
sampling and its DP noise draw from the process-wide `random` and `np.random`; the clipping-norm
key and the federation accountant live in `flwr.supercore`; a message that arrived from no node
(the server's own stand-in reply) needs Message's metadata keyword, outside its public overloads.
fedtune relies on each of these here and nowhere else, and `tests/test_flower_adapter.py` checks
each one against the installed Flower, so an upgrade that changes one fails there, by name,
instead of as a wrong result.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import numpy as np
from flwr.app import ArrayRecord, Message, Metadata, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from common.records import state_to_record

__all__ = [
    "KEY_CLIPPING_NORM",
    "STATEFUL_ATTRS",
    "OrderedGrid",
    "PromptGrid",
    "agreed_key",
    "server_made_reply",
    "dp_clipping_norm",
    "federation_epsilon",
    "find_strategy",
    "join_shares",
    "load_strategy_state",
    "new_key_pair",
    "open_share",
    "seal_share",
    "seed_sampling_and_noise",
    "set_dp_sample_size",
    "split_secret",
    "strategy_chain",
    "strategy_state",
]

# Attributes of Flower's strategies that carry state from one round to the next (FedOpt's
# current arrays and moments, FedAvgM's momentum, the adaptive DP wrapper's clipping norm).
STATEFUL_ATTRS = ("current_arrays", "momentum_vector", "m_t", "v_t", "clipping_norm")


def strategy_chain(strategy) -> Iterator[tuple[str, object]]:
    """(level name, strategy) from the outermost wrapper inwards: Flower's DP wrappers (and
    fedtune's validation) keep the strategy they wrap in `.strategy`."""
    depth = 0
    while strategy is not None:
        yield f"s{depth}", strategy
        strategy, depth = getattr(strategy, "strategy", None), depth + 1


def find_strategy(strategy, kind: type):
    """The first strategy of the chain that is a `kind`, or None."""
    return next((s for _, s in strategy_chain(strategy) if isinstance(s, kind)), None)


def _dp_wrapper(strategy):
    """Flower's client-level DP wrapper in the chain (it alone has num_sampled_clients), or None."""
    return next((s for _, s in strategy_chain(strategy) if hasattr(s, "num_sampled_clients")), None)


def set_dp_sample_size(strategy, sampled: int) -> None:
    """Flower's DP wrapper noises the average with std z*C/num_sampled_clients, fixed when it is
    built; set it to the clients actually sampled this round (at least 1)."""
    wrapper = _dp_wrapper(strategy)
    if wrapper is not None:
        wrapper.num_sampled_clients = max(1, sampled)


def dp_clipping_norm(strategy, default: float) -> float:
    """The clipping norm the DP wrapper uses now (adaptive clipping moves it every round)."""
    wrapper = _dp_wrapper(strategy)
    return float(getattr(wrapper, "clipping_norm", default)) if wrapper is not None else float(default)


def seed_sampling_and_noise(seed: int) -> None:
    """Flower samples nodes with `random.sample` and draws DP noise from `np.random`: seed both."""
    random.seed(seed)
    np.random.seed(seed % 2**32)


def strategy_state(strategy) -> dict[str, np.ndarray]:
    """Flatten the round-to-round state of the strategy chain into named arrays for a checkpoint."""
    out: dict[str, np.ndarray] = {}
    for level, s in strategy_chain(strategy):
        for attr in STATEFUL_ATTRS:
            value = getattr(s, attr, None)
            if value is None:
                continue
            if isinstance(value, ArrayRecord):
                value, kind = {k: v.numpy() for k, v in value.items()}, "record"
            elif isinstance(value, dict):
                kind = "dict"
            elif isinstance(value, (int, float)):
                value, kind = {"value": np.float64(value)}, "scalar"
            else:
                value, kind = {str(i): v for i, v in enumerate(value)}, "list"
            for key, array in value.items():
                out[f"{level}|{attr}|{kind}|{key}"] = np.asarray(array)
    return out


def load_strategy_state(strategy, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of `strategy_state`."""
    levels = dict(strategy_chain(strategy))
    grouped: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        level, attr, kind, key = name.split("|", 3)
        grouped.setdefault((level, attr, kind), {})[key] = array
    for (level, attr, kind), values in grouped.items():
        target = levels[level]
        if kind == "record":
            setattr(target, attr, state_to_record(values))
        elif kind == "dict":
            setattr(target, attr, values)
        elif kind == "scalar":
            setattr(target, attr, float(values["value"]))
        else:
            setattr(target, attr, [values[str(i)] for i in range(len(values))])


REPLY_POLL_S = 0.1  # how often PromptGrid asks for replies (Flower's simulation Grid: 0.1 s; its deployed Grid: 3 s)


class PromptGrid:
    """The Grid, asking for replies every REPLY_POLL_S seconds.

    Flower 1.42's deployed Grid (flwr.superlink.grid.http_grid) sleeps 3 s between pulls while it
    waits for the replies of `send_and_receive`, so every exchange of a deployed round waits up to 3 s
    after its last reply arrived (bench/README.md, "Warm deployed clients"). This one pushes and pulls
    with the Grid's own public calls, as Flower's does, only more often: one small request from the
    ServerApp to its SuperLink every 0.1 s while a round waits. Everything else is the Grid's.
    """

    def __init__(self, grid) -> None:
        self._grid = grid

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        waiting = set(self._grid.push_messages(messages))  # sets each message's id
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies += got
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(REPLY_POLL_S)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


class OrderedGrid:
    """One round's view of the Grid: a snapshot of the connected nodes, ordered by client id.

    Flower's `sample_nodes` draws from `grid.get_node_ids()` in the order given, so the order
    makes seeded sampling repeat across restarts. The snapshot keeps it from waiting without a
    deadline when a node drops out between counting and sampling (it waits while fewer nodes
    are connected than it chose to sample); fedtune's own wait for min-available-clients,
    bounded by round-timeout, runs before the snapshot.
    """

    def __init__(self, grid, client_ids: dict[int, str]) -> None:
        self._grid = grid
        self._nodes = sorted(grid.get_node_ids(), key=lambda n: (n not in client_ids, client_ids.get(n, ""), n))

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)


def federation_epsilon(mechanisms: list[dict], delta: float) -> float:
    """Flower's own RDP accountant over the federation's rounds (each {noise_multiplier,
    sample_size, population}): the audit's independent check of the ledger's figure."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    if not mechanisms:
        return 0.0
    config = PrivacyConfig(
        target_delta=delta,
        population_size=max(m["population"] for m in mechanisms),
        neighboring_relation=NeighboringRelation.REPLACE_ONE,
        sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
    )
    accountant = RdpAccountant(config)
    for m in mechanisms:
        accountant.compose(
            GaussianPrivacyEvent(
                noise_multiplier=m["noise_multiplier"], sample_size=m["sample_size"], population_size=m["population"]
            )
        )
    return float(accountant.get_epsilon(delta))


# --- Secure aggregation: Flower's SecAgg+ primitives --------------------------------------------
# Flower 1.42 runs its SecAgg+ workflow only on the legacy path (a LegacyContext, legacy fit
# messages); fedtune drives the protocol from its own loop (common/secagg.py) and takes the
# cryptography from Flower: EC key pairs (SECP384R1), ECDH + HKDF key agreement, Fernet
# authenticated encryption, Shamir secret sharing (pycryptodome) and the framing of a share
# pair. Flower's own mask generator is not used: it folds its seed to 32 bits (see secagg.py).


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh (private, public) EC key pair, PEM-encoded."""
    private, public = generate_key_pairs()
    return private_key_to_bytes(private), public_key_to_bytes(public)


def agreed_key(private_pem: bytes, public_pem: bytes) -> bytes:
    """The 32-byte key two parties agree on (ECDH, then HKDF-SHA256), URL-safe base64 as Fernet wants it."""
    return generate_shared_key(bytes_to_private_key(private_pem), bytes_to_public_key(public_pem))


def split_secret(secret: bytes, *, threshold: int, shares: int) -> list[bytes]:
    """Shamir shares of `secret`: any `threshold` of the `shares` rebuild it, fewer reveal nothing."""
    return create_shares(secret, threshold, shares)


def join_shares(shares: list[bytes]) -> bytes:
    """The secret from at least a threshold of its shares (ValueError when they do not fit)."""
    return combine_shares(shares)


def seal_share(key: bytes, *, src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    """Encrypt and authenticate one party's pair of shares for another (Fernet)."""
    return encrypt(key, share_keys_plaintext_concat(src, dst, seed_share, key_share))


def open_share(key: bytes, ciphertext: bytes) -> tuple[int, int, bytes, bytes]:
    """(src, dst, seed share, key share) of a sealed share; raises when it was not sealed with `key`."""
    return share_keys_plaintext_separate(decrypt(key, ciphertext))


def server_made_reply(content: RecordDict, *, message_id: str, group_id: str) -> Message:
    """A training reply the server builds itself (no node sent it), for a strategy's aggregate_train:
    Flower builds received messages with a `metadata` keyword its public constructors do not offer."""
    metadata = Metadata(
        run_id=0,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content, metadata=metadata)  # type: ignore[call-overload]  # the constructor's internal form
