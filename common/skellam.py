"""The Skellam mechanism: discrete noise that survives a modular secure sum, and its privacy.

Skellam noise is the difference of two independent Poisson variables; with variance mu it is
Poisson(mu/2) - Poisson(mu/2), and the sum of independent Skellam variables is Skellam with the
summed variance. So K clients that each add Skellam(mu / K') to an integer vector give a sum that
carries Skellam(mu * survivors / K') exactly, which a discrete Gaussian cannot (its sum is not
discrete Gaussian; Kairouz, Liu, Steinke 2021, https://arxiv.org/abs/2102.06387).

Privacy (Agarwal, Kairouz, Liu 2021, https://arxiv.org/abs/2110.04995, Theorem 3.5): adding
Skellam noise of variance mu per coordinate to an integer vector with L2 sensitivity D2 and L1
sensitivity D1 is (alpha, eps(alpha))-RDP for integer alpha > 1 with

    eps(alpha) = alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)),

the Gaussian's alpha D2^2 / (2 mu) plus a term that vanishes as the scale grows. Poisson
subsampling at rate q is amplified with Zhu & Wang's general upper bound for any mechanism
(ICML 2019, "Poisson subsampled Renyi differential privacy", http://proceedings.mlr.press/v97/zhu19c),
taking the smaller of it and eps(alpha) at each order; steps compose by adding RDP.

Sensitivity of a rounded sum: a client scales its sum of clipped per-example gradients by s and
rounds each coordinate up or down at random (unbiased). Write that rounding as floor(v + U) with
U uniform in [0, 1) per coordinate; with the same U on both sides, removing one example (a
change t of L2 norm at most sC) changes each rounded coordinate by floor(t) or ceil(t), so the
rounded sums differ by at most ||t|| + sqrt(d) in L2 (the bound of Kairouz et al.'s Theorem 1 for
a rounded vector), and by an integer vector, whose L1 norm is at most min(sqrt(d) D2, D2^2).
Rényi divergence is jointly quasi-convex, so the mixture over U (the same on both sides) keeps the
bound: D2 = sC + sqrt(d).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import special

ORDERS = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256)  # integer orders: the bounds need them


def sensitivities(*, scale: float, clipping_norm: float, dimension: int) -> tuple[float, float]:
    """(L2, L1) sensitivity of a randomly rounded, s-scaled sum of vectors clipped to `clipping_norm`."""
    l2 = scale * clipping_norm + math.sqrt(dimension)
    return l2, min(math.sqrt(dimension) * l2, l2 * l2)


def skellam_rdp(order, *, l2: float, l1: float, variance: float):
    """RDP at integer order(s) of adding Skellam noise of `variance` per coordinate (Theorem 3.5)."""
    a = np.asarray(order, dtype=np.float64)
    return a * l2 * l2 / (2 * variance) + np.minimum(
        ((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * variance * variance), 3 * l1 / (2 * variance)
    )


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def poisson_subsampled_rdp(order: int, rate: float, rdp: np.ndarray) -> float:
    """Zhu & Wang's general upper bound on the RDP at `order` of a mechanism whose RDP at integer
    order l is rdp[l] (for 2 <= l <= order), run on a Poisson sample at `rate`; never above the
    unsampled rdp[order]."""
    a, q = order, rate
    if q >= 1.0:
        return float(rdp[a])
    log_q, log_1q = math.log(q), math.log1p(-q)
    ls = np.arange(3, a + 1)
    terms = np.concatenate(
        [
            [
                (a - 1) * log_1q + math.log1p((a - 1) * q),
                math.log(a * (a - 1) / 2) + 2 * log_q + (a - 2) * log_1q + rdp[2],
            ],
            math.log(3.0) + _log_comb(a, ls) + ls * log_q + (a - ls) * log_1q + (ls - 1) * rdp[3 : a + 1],
        ]
    )
    bound = special.logsumexp(terms) / (a - 1)
    return float(min(bound, rdp[a]))


@lru_cache(maxsize=4096)
def subsampled_skellam_rdp(*, rate: float, l2: float, l1: float, variance: float) -> tuple[float, ...]:
    """RDP of one Poisson-subsampled Skellam step at every order of ORDERS."""
    rdp = np.zeros(max(ORDERS) + 1)
    rdp[2:] = skellam_rdp(np.arange(2, max(ORDERS) + 1), l2=l2, l1=l1, variance=variance)
    return tuple(poisson_subsampled_rdp(a, rate, rdp) for a in ORDERS)


def noise_share_variance(variance: float, *, threshold: int) -> float:
    """What each client adds so that any `threshold` of them (the sampled clients less the drop-outs or
    colluders tolerated) carry `variance` together: sqrt(K / (K - c)) times the target std for all K."""
    return variance / threshold


def skellam_noise(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of Skellam noise with `variance` per coordinate (int64)."""
    lam = variance / 2.0
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)
