"""Adapters as integer vectors for secure aggregation, and back.

A secure sum adds integers modulo M (common/secagg.py). What a client uploads is one flat
integer vector: a header of counts followed by its adapter values, scaled and randomly rounded
(unbiased: up with probability equal to the fractional part). The server unmasks the sum,
reads the header and scales the values back.

- Without DP (or with local DP): a client uploads [examples, loss * examples * LOSS_SCALE,
  coordinates clipped, round(s * examples * clip(update, +-UPDATE_RANGE))], so the sum gives
  the examples-weighted mean update and mean training loss, and how many coordinates left the
  range. The scale s is the server's: as large as keeps the sum inside +-M/2.
- Distributed DP: a client uploads round(s * sum of clipped per-example gradients) plus its
  share of Skellam noise, nothing else (a count of the examples it sampled would itself leak).
"""

from __future__ import annotations

import numpy as np

from common.secagg import MODULUS

UPDATE_RANGE = 8.0  # |update| per coordinate beyond this is clipped (and counted): Flower's default too
LOSS_SCALE = 1000.0
HEADER = ("examples", "loss", "clipped")


def flatten(state: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """The arrays of `state`, in `names` order, as one float64 vector."""
    return np.concatenate([np.asarray(state[n], dtype=np.float64).ravel() for n in names]) if names else np.zeros(0)


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The inverse of `flatten`, in the shapes and dtypes of `like`."""
    out, at = {}, 0
    for n in names:
        size = like[n].size
        out[n] = vector[at : at + size].reshape(like[n].shape).astype(like[n].dtype)
        at += size
    if at != vector.size:
        raise ValueError(f"unflatten: expected {at} values, got {vector.size}")
    return out


def randomized_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each value to the integer below or above it, up with probability equal to its fractional part
    (unbiased); the same as floor(v + U) for U uniform in [0, 1)."""
    floor = np.floor(values)
    return (floor + (rng.random(values.shape) < values - floor)).astype(np.int64)


def update_scale(*, total_weight: float, clients: int) -> float:
    """The largest scale s that keeps a sum of `clients` uploads of round(s * weight * update), with
    |update| <= UPDATE_RANGE and the weights adding up to at most `total_weight`, inside +-M/4 (the
    other half of the range is headroom for rounding and the header)."""
    return (MODULUS // 4) / (max(total_weight, 1.0) * UPDATE_RANGE + clients)


def encode_update(
    update: np.ndarray, *, examples: int, loss: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """The integer upload of one client's update (see the module docstring)."""
    clipped = np.clip(update, -UPDATE_RANGE, UPDATE_RANGE)
    outside = int(np.count_nonzero(clipped != update))
    header = np.array([examples, round(loss * examples * LOSS_SCALE), outside], dtype=np.int64)
    return np.concatenate([header, randomized_round(scale * examples * clipped, rng)])


def decode_update(total: np.ndarray, *, scale: float) -> tuple[np.ndarray, dict[str, float]]:
    """(mean update, {examples, loss, clipped}) from the unmasked, signed sum of `encode_update`s."""
    examples, loss, clipped = (float(v) for v in total[: len(HEADER)])
    if examples <= 0:
        raise ValueError(f"secure sum: expected a positive number of examples, got {examples:g}")
    mean = total[len(HEADER) :].astype(np.float64) / (scale * examples)
    return mean, {"examples": examples, "loss": loss / (LOSS_SCALE * examples), "clipped": clipped}
