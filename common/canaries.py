"""Gradient canaries and the one-run privacy audit (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846).

`fedtune audit` checks that every recorded epsilon follows from the recorded mechanism; it cannot
see whether the mechanism that ran is the recorded one. Canaries give evidence from the run itself:
a lower bound on the epsilon of what ran, which must not exceed the recorded epsilon.

A client with `dp-audit-canaries = m` holds m canaries, random unit directions u_i in the adapter's
parameter space, and includes each with probability 1/2 (both from its secret canary seed). An
included canary is one more record of the client's DP-SGD: at every step it is drawn at the data's
Poisson rate and, when drawn, its gradient (CANARY_NORM clipping norms along u_i) joins the step's
per-example gradients, is clipped by the same code and noised with them. Poisson sampling protects
each record at the rate it is drawn, so the accountant's epsilon for (rate, noise, steps) covers the
canaries as it covers the data; the step's normalisation (the expected batch of the data) is a
constant, post-processing. Excluded canaries never touch training.

After the run the client reveals its seed; anyone holding the run's checkpoints recomputes each
canary's scores (`canary_scores`) from the global adapter of every round:
- alignment: how far the adapter moved against the canary over the run, <theta_0 - theta_R, u_i>
  (a descent step moves against a gradient);
- repetition: sum over rounds of <Delta_r - Delta_{r-1}, u_i>^2, the change from one round's move to
  the next along u_i. Noise that repeats from round to round cancels in it; an included canary's
  number of draws does not.
The auditor guesses "included" for the k highest scores. If the training is (epsilon, delta)-DP with
respect to each canary, the number of correct guesses is dominated by Binomial(k, e^eps / (1 + e^eps))
up to a delta term (the paper's Theorem 5.2, `p_value`). The lower bound is the largest epsilon that
the observed count rejects at the confidence asked, Bonferroni-corrected over the guess counts
(`guess_counts`) and the two scores tried. The bound is valid whatever the scores are; a weak score
only makes it small. It has a ceiling: at delta 1e-5 a perfect score shows about 3.3 with 300
canaries, 4.4 with 1,000 and 4.9 with 3,000, and no more with more canaries (the delta term grows
with m); a recorded epsilon above ~5 cannot be contradicted, so bugs show at small epsilons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from common.errors import FedtuneError

CANARY_NORM = 100.0  # a canary's gradient before clipping, in clipping norms: 100x louder if a step skips clipping
SCORES = ("alignment", "repetition")
CONFIDENCE = 0.95


class CanaryError(FedtuneError, ValueError):
    """Canaries that cannot be scored as recorded."""


@dataclass(frozen=True)
class Canaries:
    """A client's m canaries, all drawn from its secret `seed`."""

    seed: int
    count: int

    @cached_property
    def included(self) -> np.ndarray:
        """Which canaries train (probability 1/2 each), as a bool array of length `count`."""
        return np.random.default_rng([self.seed, 0]).random(self.count) < 0.5

    def direction(self, i: int, dimension: int) -> np.ndarray:
        """Canary i's unit direction in a `dimension`-sized flat adapter (float64)."""
        u = np.random.default_rng([self.seed, 1, i]).standard_normal(dimension)
        return u / math.sqrt(float(np.square(u).sum()))  # not np.linalg.norm: BLAS threads would spin in clients

    def drawn(self, sample_rate: float, server_round: int, step: int) -> np.ndarray:
        """The included canaries drawn (Poisson, at `sample_rate`) for one step of one round."""
        hits = np.random.default_rng([self.seed, 2, server_round, step]).random(self.count) < sample_rate
        return np.flatnonzero(hits & self.included)


@dataclass(frozen=True)
class Layout:
    """A fixed order of an adapter's tensors (by name), to treat the adapter as one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> Layout:
        names = tuple(sorted(shapes))
        return cls(names, tuple(tuple(shapes[n]) for n in names))

    @property
    def dimension(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, state: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(state[n], dtype=np.float64).ravel() for n in self.names])

    def split(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """[k, dimension] -> {name: [k, *shape]}."""
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = rows[:, at : at + size].reshape(len(rows), *shape)
            at += size
        return out


def canary_gradients(
    canaries: Canaries, layout: Layout, clipping_norm: float, *, sample_rate: float, server_round: int, step: int
) -> dict[str, np.ndarray] | None:
    """The per-example gradients of the canaries drawn for this step, by tensor name ([k, *shape],
    float32, each of norm CANARY_NORM * clipping_norm before clipping); None when none is drawn."""
    drawn = canaries.drawn(sample_rate, server_round, step)
    if not len(drawn):
        return None
    rows = np.stack([canaries.direction(int(i), layout.dimension) for i in drawn]) * (CANARY_NORM * clipping_norm)
    return layout.split(rows.astype(np.float32))


def canary_scores(canaries: Canaries, rounds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each canary's scores (SCORES) from the global adapter after each round, round 0 first."""
    if len(rounds) < 2:
        raise CanaryError(f"canary scores: expected the adapter of round 0 and at least one round, got {len(rounds)}")
    layout = Layout.of({k: np.shape(v) for k, v in rounds[0].items()})
    flat = np.stack([layout.flatten(s) for s in rounds])
    moved = flat[-1] - flat[0]
    changes = np.diff(flat, n=2, axis=0)  # Delta_r - Delta_{r-1}
    alignment, repetition = np.empty(canaries.count), np.empty(canaries.count)
    for i in range(canaries.count):
        u = canaries.direction(i, layout.dimension)
        alignment[i] = -(moved @ u)
        repetition[i] = float(np.sum((changes @ u) ** 2))
    return {"alignment": alignment, "repetition": repetition}


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability of at least `correct` right guesses out of `guesses` among m canaries if the
    training were (epsilon, delta)-DP for each canary (Steinke et al. 2023, Theorem 5.2):
    f(v) + 2 m delta max_{1<=i<=v} (f(v - i) - f(v)) / i, with f(v) = P[Binomial(guesses, p) >= v]
    and p = e^epsilon / (1 + e^epsilon)."""
    from scipy import special, stats  # only auditing needs scipy: not the clients that train

    p = special.expit(epsilon)
    tail = stats.binom.sf(correct - 1, guesses, p)
    if delta == 0 or correct == 0:
        return float(min(tail, 1.0))
    i = np.arange(1, correct + 1)
    excess = (stats.binom.sf(correct - i - 1, guesses, p) - tail) / i
    return float(min(tail + 2 * m * delta * max(float(excess.max()), 0.0), 1.0))


def largest_rejected_epsilon(m: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest epsilon whose (epsilon, delta)-DP claim `correct` of `guesses` right rejects at
    `significance` (0 when even epsilon 0 is not rejected). p_value grows with epsilon: bisection."""
    if guesses == 0 or p_value(m, guesses, correct, 0.0, delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, guesses, correct, hi, delta) <= significance:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, guesses, correct, mid, delta) <= significance else (lo, mid)
        if hi - lo < 1e-6:
            break
    return lo


def guess_counts(m: int) -> list[int]:
    """How many of the highest-scored canaries the auditor guesses "included": 1, 2, 4, ..., m / 2 (about
    as many as are included: a perfect score gets them all right) and m. Fixed before any score is
    seen, so a Bonferroni correction over them keeps the bound valid."""
    counts, k = {m, max(1, m // 2)}, 1
    while k < m:
        counts.add(k)
        k *= 2
    return sorted(counts)


@dataclass(frozen=True)
class Bound:
    """An empirical lower bound on epsilon and the test that gave it."""

    epsilon: float
    confidence: float
    canaries: int
    score: str = ""
    guesses: int = 0
    correct: int = 0

    def to_json(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "confidence": self.confidence,
            "canaries": self.canaries,
            "score": self.score,
            "guesses": self.guesses,
            "correct": self.correct,
        }


def epsilon_lower_bound(
    scores: dict[str, np.ndarray], included: np.ndarray, *, delta: float, confidence: float = CONFIDENCE
) -> Bound:
    """The one-run lower bound on epsilon at `confidence` from canary scores (higher = more likely
    included) and the true inclusion bits: the best over every score and guess count, each tested at
    (1 - confidence) / (number of tests)."""
    included = np.asarray(included, dtype=bool)
    m = len(included)
    if not 0 < confidence < 1:
        raise CanaryError(f"canary audit: expected a confidence in (0, 1), got {confidence}")
    if m == 0:
        raise CanaryError("canary audit: expected at least one canary, got none")
    for name, s in scores.items():
        if np.shape(s) != (m,) or not np.all(np.isfinite(s)):
            raise CanaryError(f"canary audit: expected {m} finite {name} scores, got shape {np.shape(s)}")
    counts = guess_counts(m)
    significance = (1 - confidence) / (len(counts) * len(scores))
    best = Bound(0.0, confidence, m)
    for name in sorted(scores):
        order = np.argsort(-np.asarray(scores[name]), kind="stable")  # ties: by index, which knows no bit
        right = np.cumsum(included[order])
        for k in counts:
            eps = largest_rejected_epsilon(m, k, int(right[k - 1]), delta, significance)
            if eps > best.epsilon:
                best = Bound(eps, confidence, m, name, k, int(right[k - 1]))
    return best
