"""Secure aggregation: the server learns the sum of the clients' integer vectors and nothing else.

The protocol is SecAgg+'s four stages (Bell et al. 2020, https://eprint.iacr.org/2020/704; the
same flow as Flower's SecAggPlusWorkflow) over the complete graph, where every client is every
other's neighbour, which is Bonawitz et al. 2017's SecAgg (https://eprint.iacr.org/2017/281):
federations of organisations are small, and the complete graph tolerates the most dropouts.

1. keys:    each sampled client makes two fresh key pairs (one to agree mask seeds, one to agree
            encryption keys) and sends the public halves.
2. shares:  given everyone's public keys, each client draws a self-mask seed b and Shamir-shares b
            and its mask private key among all, each pair of shares encrypted for its recipient.
3. masked:  each client stores the shares sent to it and uploads y = x + PRG(b) + sum over the
            others v of +-PRG(s_uv) mod M, s_uv being the seed u and v agree on (+ when u > v).
4. unmask:  the clients still present send, for each client whose y arrived, its share of b, and
            for each client that dropped after stage 2, its share of the mask key; with `threshold`
            shares of each the server removes every mask and holds sum(x) mod M.

Keys are made fresh every round, so no mask repeats across rounds; the mask generator binds the
run and the round too. A client answers one unmask request per round, never reveals both shares of
one client, and refuses sets smaller than the threshold, so a server that follows the protocol
learns one sum of at least `threshold` clients' vectors. Cryptographic primitives come from
Flower (common/flower.py) and `cryptography`; the mask generator is ChaCha20 keyed through HKDF
(Flower's `pseudo_rand_gen` folds its seed to 32 bits and seeds NumPy's Mersenne Twister with it:
2^32 guesses would recover a mask). Framework-free: common/secagg.py never sees a Flower message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import FedtuneError
from common.flower import agreed_key, join_shares, new_key_pair, open_share, seal_share, split_secret

MODULUS_BITS = 32
MODULUS = 2**MODULUS_BITS  # vectors are summed in Z_M; the uniform mask words are exactly uniform there
SEED_BYTES = 32
STAGES = ("keys", "shares", "masked", "unmask")
ACTIONS = {stage: f"secagg_{stage}" for stage in STAGES}  # a ClientApp registers one train action per stage


class SecAggError(FedtuneError, RuntimeError):
    """A secure-aggregation message broke the protocol; the round cannot use it."""


def minimum_threshold(clients: int) -> int:
    """The smallest threshold that keeps a single sum: more than half of the sampled clients, so that
    no two disjoint sets of survivors can each be unmasked."""
    return clients // 2 + 1


def threshold_for(clients: int, max_dropouts: int) -> int:
    """Shares needed to unmask when up to `max_dropouts` of `clients` may drop out; refused below a majority."""
    threshold = clients - max_dropouts
    if clients < 2 or threshold < minimum_threshold(clients):
        raise SecAggError(
            f"secure aggregation: expected at least 2 clients and more than half of them ("
            f"{minimum_threshold(clients)} of {clients}) left after secagg-max-dropouts = "
            f"{max_dropouts}, got {max(threshold, 0)}"
        )
    return threshold


def mask_words(seed: bytes, length: int, *, context: bytes) -> np.ndarray:
    """`length` uniform elements of Z_M (as int64) from a secret seed: the ChaCha20 keystream under a
    key derived from the seed and `context` (run, round, purpose) with HKDF-SHA256."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedtune-secagg|" + context).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.int64)


def to_field(values: np.ndarray) -> np.ndarray:
    """Signed integers into Z_M (int64, in [0, M))."""
    return np.mod(np.asarray(values, dtype=np.int64), MODULUS)


def from_field(values: np.ndarray) -> np.ndarray:
    """Elements of Z_M back to signed integers in [-M/2, M/2)."""
    values = np.mod(np.asarray(values, dtype=np.int64), MODULUS)
    return np.where(values >= MODULUS // 2, values - MODULUS, values)


def _context(run: str, server_round: int, purpose: str, *parties: int) -> bytes:
    return "|".join([run, str(server_round), purpose, *map(str, parties)]).encode()


def _pair_seed(private_pem: bytes, public_pem: bytes) -> bytes:
    import base64

    return base64.urlsafe_b64decode(agreed_key(private_pem, public_pem))


# --- the client's side ---------------------------------------------------------------------------


@dataclass
class ClientRound:
    """One client's secrets and progress in one round; kept between the round's messages."""

    node: int
    run: str
    server_round: int
    threshold: int
    mask_key: bytes  # private key agreeing pairwise mask seeds (its shares let the server drop us)
    mask_public: bytes
    seal_key: bytes  # private key agreeing the keys that encrypt shares
    seal_public: bytes
    stage: str = "keys"
    seed: bytes = b""  # the self-mask seed b
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (mask public, seal public)
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # shares held for others (and our own)
    key_shares: dict[int, bytes] = field(default_factory=dict)
    masked_with: list[int] = field(default_factory=list)  # the peers whose pairwise masks our vector carries

    def _expect(self, stage: str) -> None:
        previous = STAGES[STAGES.index(stage) - 1]
        if self.stage != previous:
            raise SecAggError(
                f"secure aggregation round {self.server_round}: expected stage {stage!r} after "
                f"{previous!r}, but this client is at {self.stage!r}"
            )
        self.stage = stage


def client_keys(*, node: int, run: str, server_round: int, threshold: int, clients: int) -> ClientRound:
    """Stage 1: fresh key pairs for this round (their public halves go to the server)."""
    if not 1 < threshold <= clients or threshold < minimum_threshold(clients):
        raise SecAggError(
            f"secure aggregation: expected a threshold above half of the {clients} sampled clients, got {threshold}"
        )
    mask_key, mask_public = new_key_pair()
    seal_key, seal_public = new_key_pair()
    return ClientRound(
        node=node,
        run=run,
        server_round=server_round,
        threshold=threshold,
        mask_key=mask_key,
        mask_public=mask_public,
        seal_key=seal_key,
        seal_public=seal_public,
    )


def client_shares(state: ClientRound, peers: dict[int, tuple[bytes, bytes]]) -> list[tuple[int, bytes]]:
    """Stage 2: share the self-mask seed and the mask key among `peers` (everyone who sent keys, us
    included); returns (destination, ciphertext) for every other peer."""
    state._expect("shares")
    if peers.get(state.node) != (state.mask_public, state.seal_public):
        raise SecAggError(
            f"secure aggregation: the server's key list does not hold this client's own keys (node {state.node})"
        )
    keys = [k for pair in peers.values() for k in pair]
    if len(set(keys)) != len(keys):
        raise SecAggError("secure aggregation: two parties announced the same public key")
    if len(peers) < state.threshold:
        raise SecAggError(f"secure aggregation: expected at least {state.threshold} parties, got {len(peers)}")
    state.peers = dict(sorted(peers.items()))
    state.seed = os.urandom(SEED_BYTES)
    order = list(state.peers)
    seed_shares = split_secret(state.seed, threshold=state.threshold, shares=len(order))
    key_shares = split_secret(state.mask_key, threshold=state.threshold, shares=len(order))
    out = []
    for node, seed_share, key_share in zip(order, seed_shares, key_shares, strict=True):
        if node == state.node:
            state.seed_shares[node], state.key_shares[node] = seed_share, key_share
            continue
        key = agreed_key(state.seal_key, state.peers[node][1])
        out.append((node, seal_share(key, src=state.node, dst=node, seed_share=seed_share, key_share=key_share)))
    return out


def client_mask(state: ClientRound, received: list[tuple[int, bytes]], vector: np.ndarray) -> np.ndarray:
    """Stage 3: keep the shares others sealed for us, then mask `vector` (elements of Z_M)."""
    state._expect("masked")
    for src, ciphertext in received:
        if src not in state.peers or src == state.node:
            raise SecAggError(f"secure aggregation: a share from node {src}, which is not a peer of this round")
        try:
            sender, dst, seed_share, key_share = open_share(agreed_key(state.seal_key, state.peers[src][1]), ciphertext)
        except Exception as err:  # cryptography's InvalidToken and framing errors alike
            raise SecAggError(
                f"secure aggregation: the share from node {src} does not open ({type(err).__name__})"
            ) from None
        if (sender, dst) != (src, state.node):
            raise SecAggError(
                f"secure aggregation: a share sealed from {sender} to {dst} arrived as {src} to {state.node}"
            )
        state.seed_shares[src], state.key_shares[src] = seed_share, key_share
    state.masked_with = sorted(src for src, _ in received)
    if len(state.masked_with) + 1 < state.threshold:
        raise SecAggError(
            f"secure aggregation: expected shares from at least {state.threshold - 1} others, got "
            f"{len(state.masked_with)}"
        )
    vector = np.asarray(vector, dtype=np.int64)
    if vector.ndim != 1 or vector.size and (vector.min() < 0 or vector.max() >= MODULUS):
        raise SecAggError("secure aggregation: expected a flat vector of elements of Z_M")
    masked = vector + mask_words(state.seed, vector.size, context=_context(state.run, state.server_round, "self"))
    for other in state.masked_with:
        pair = mask_words(
            _pair_seed(state.mask_key, state.peers[other][0]),
            vector.size,
            context=_context(state.run, state.server_round, "pair", *sorted((state.node, other))),
        )
        masked += pair if state.node > other else -pair
    return np.mod(masked, MODULUS)


def client_unmask(state: ClientRound, *, active: list[int], dropped: list[int]) -> list[tuple[int, bytes]]:
    """Stage 4: our share of b for every client whose vector arrived, of the mask key for every client
    that dropped after sharing. Once per round; never both shares of one client."""
    state._expect("unmask")
    active_set, dropped_set = set(active), set(dropped)
    if active_set & dropped_set:
        raise SecAggError(
            f"secure aggregation: nodes {sorted(active_set & dropped_set)} are named both active and "
            "dropped (both of their shares would unmask their vectors)"
        )
    unknown = (active_set | dropped_set) - set(state.seed_shares)
    if unknown:
        raise SecAggError(f"secure aggregation: asked for shares of nodes {sorted(unknown)} this client holds none of")
    if state.node not in active_set or len(active_set) < state.threshold:
        raise SecAggError(
            f"secure aggregation: expected at least {state.threshold} active clients including this one, "
            f"got {len(active_set)}"
        )
    shares = [(n, state.seed_shares[n]) for n in sorted(active_set)]
    shares += [(n, state.key_shares[n]) for n in sorted(dropped_set)]
    state.mask_key = state.seal_key = state.seed = b""  # done with this round's secrets
    state.seed_shares, state.key_shares = {}, {}
    return shares


# --- the server's side ---------------------------------------------------------------------------


@dataclass
class ServerRound:
    """The server's view of one round: who is still in, their public keys, the sum so far."""

    run: str
    server_round: int
    sampled: list[int]
    threshold: int
    length: int
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: list[int] = field(default_factory=list)  # sent their shares (stage 2)
    masked: list[int] = field(default_factory=list)  # their masked vectors arrived (stage 3)
    total: np.ndarray | None = None

    def enough(self, survivors) -> bool:
        return len(survivors) >= self.threshold

    def add_keys(self, node: int, mask_public: bytes, seal_public: bytes) -> None:
        self.keys[node] = (mask_public, seal_public)

    def route(self, sealed: dict[int, list[tuple[int, bytes]]]) -> dict[int, list[tuple[int, bytes]]]:
        """Stage 2 -> 3: the ciphertexts each client that shared should receive, as (source, ciphertext)."""
        self.shared = sorted(sealed)
        inbox: dict[int, list[tuple[int, bytes]]] = {node: [] for node in self.shared}
        for src, items in sorted(sealed.items()):
            for dst, ciphertext in items:
                if dst in inbox and dst != src:
                    inbox[dst].append((src, ciphertext))
        return inbox

    def add_masked(self, node: int, vector: np.ndarray) -> None:
        vector = np.asarray(vector)
        if vector.dtype != np.int64 or vector.shape != (self.length,) or vector.min() < 0 or vector.max() >= MODULUS:
            raise SecAggError(
                f"secure aggregation: expected {self.length} int64 elements of Z_M, got "
                f"{vector.dtype} of shape {vector.shape}"
            )
        self.total = vector.copy() if self.total is None else np.mod(self.total + vector, MODULUS)
        self.masked.append(node)

    def dropped(self) -> list[int]:
        """Clients that sent shares but whose masked vector never arrived."""
        return sorted(set(self.shared) - set(self.masked))

    def unmask(self, replies: dict[int, list[tuple[int, bytes]]]) -> np.ndarray:
        """Stage 4: remove every mask from the sum of the masked vectors; raises SecAggError when
        fewer than `threshold` shares of some secret arrived or they do not rebuild it."""
        if not self.enough(replies):
            raise SecAggError(
                f"secure aggregation: expected shares from at least {self.threshold} clients, got {len(replies)}"
            )
        held: dict[int, list[bytes]] = {n: [] for n in [*self.masked, *self.dropped()]}
        for items in replies.values():
            for owner, share in items:
                if owner in held:
                    held[owner].append(share)
        if self.total is None:
            raise SecAggError("secure aggregation: expected masked vectors to unmask, got none")
        total = self.total.copy()
        for node in self.masked:
            seed = self._rebuild(node, held[node], "self-mask seed")
            total -= mask_words(seed, self.length, context=_context(self.run, self.server_round, "self"))
        for node in self.dropped():
            mask_key = self._rebuild(node, held[node], "mask key")
            for other in self.masked:  # the pairwise masks `other` added towards the dropped client
                pair = mask_words(
                    _pair_seed(mask_key, self.keys[other][0]),
                    self.length,
                    context=_context(self.run, self.server_round, "pair", *sorted((node, other))),
                )
                total -= pair if other > node else -pair
        return np.mod(total, MODULUS)

    def _rebuild(self, node: int, shares: list[bytes], what: str) -> bytes:
        if len(shares) < self.threshold:
            raise SecAggError(
                f"secure aggregation: expected {self.threshold} shares of node {node}'s {what}, got {len(shares)}"
            )
        try:
            return join_shares(shares[: self.threshold])
        except ValueError:
            raise SecAggError(f"secure aggregation: the shares of node {node}'s {what} do not rebuild it") from None
