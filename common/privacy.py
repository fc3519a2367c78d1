"""Privacy accounting: mechanisms as data, epsilon from two accountants, calibration.

A mechanism run is recorded as a `Mechanism` (noise multiplier, sampling, steps). Epsilon
is always re-derived from the full list of mechanisms a party has run, so composing across
rounds and restarts is exact, and anyone can recompute it from a ledger.

- PLD (privacy loss distributions, Google's dp-accounting) is the tight accountant we
  report (Koskela et al. 2020; Doroshenko et al. 2022, https://arxiv.org/abs/2207.04380).
- RDP (Mironov 2017, https://arxiv.org/abs/1702.07476) is the cross-check; it overstates
  epsilon by roughly 5-30% against PLD, never understates it.
- Distributed DP adds Skellam noise (`common/skellam.py`), which neither library accounts for: a
  history that holds it is accounted by RDP at integer orders, the Skellam steps by their bound and
  any Gaussian steps by dp-accounting, added order by order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:  # dp_accounting (and scipy under it) is imported where epsilon is computed:
    import dp_accounting as dpa  # a run without DP never pays for it

POISSON = "poisson"
WITHOUT_REPLACEMENT = "without-replacement"
GAUSSIAN, SKELLAM = "gaussian", "skellam"
PLD_DISCRETIZATION = 1e-4
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])


@dataclass(frozen=True)
class Mechanism:
    """`steps` applications of a subsampled Gaussian (or Skellam) mechanism.

    sampling = "poisson": each record is included with probability `sample_rate`.
    sampling = "without-replacement": a fixed `sample_size` of `population` records.
    noise = "skellam": integer noise of variance (noise_multiplier * l2_sensitivity)^2 on an integer
    vector of the given L2 and L1 sensitivities (distributed DP, Poisson sampling only).
    """

    noise_multiplier: float
    steps: int
    sampling: str = POISSON
    sample_rate: float = 1.0
    population: int = 0
    sample_size: int = 0
    noise: str = GAUSSIAN
    l2_sensitivity: float = 0.0
    l1_sensitivity: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"noise multiplier: expected a finite value > 0, got {self.noise_multiplier}")
        if self.steps < 0:
            raise ConfigError(f"steps: expected >= 0, got {self.steps}")
        if self.sampling == POISSON:
            if not (0 < self.sample_rate <= 1):
                raise ConfigError(f"sample rate: expected a value in (0, 1], got {self.sample_rate}")
        elif self.sampling == WITHOUT_REPLACEMENT:
            if not (0 < self.sample_size <= self.population):
                raise ConfigError(f"sample size: expected 1..population={self.population}, got {self.sample_size}")
        else:
            raise ConfigError(f"sampling: expected {POISSON!r} or {WITHOUT_REPLACEMENT!r}, got {self.sampling!r}")
        if self.noise not in (GAUSSIAN, SKELLAM):
            raise ConfigError(f"noise: expected {GAUSSIAN!r} or {SKELLAM!r}, got {self.noise!r}")
        if self.noise == SKELLAM and (
            self.sampling != POISSON or not self.l2_sensitivity > 0 or not self.l1_sensitivity > 0
        ):
            raise ConfigError(
                "Skellam mechanism: expected Poisson sampling and L2 / L1 sensitivities > 0, got "
                f"{self.sampling}, {self.l2_sensitivity}, {self.l1_sensitivity}"
            )

    @property
    def variance(self) -> float:
        """Skellam: the noise variance per coordinate of the integer sum."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2

    def event(self) -> dpa.DpEvent:
        import dp_accounting as dpa

        if self.noise == SKELLAM:
            raise ConfigError("a Skellam mechanism has no dp-accounting event; account it with epsilon_rdp")

        gaussian = dpa.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == POISSON:
            sampled = dpa.PoissonSampledDpEvent(self.sample_rate, gaussian)
        else:
            sampled = dpa.SampledWithoutReplacementDpEvent(self.population, self.sample_size, gaussian)
        return dpa.SelfComposedDpEvent(sampled, self.steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Mechanism:
        return cls(**d)


def grouped(mechanisms: Sequence[Mechanism]) -> list[Mechanism]:
    """The same composition with the steps of identical mechanisms added up, in order of first
    appearance. Composing k runs of a mechanism is the mechanism self-composed k times, so the
    epsilon is unchanged, but the accountants pay per distinct mechanism, not per round."""
    steps: dict[Mechanism, int] = {}
    for m in mechanisms:
        if m.steps > 0:
            one = replace(m, steps=1)
            steps[one] = steps.get(one, 0) + m.steps
    return [replace(m, steps=n) for m, n in steps.items()]


def composed_event(mechanisms: Sequence[Mechanism]) -> dpa.DpEvent:
    import dp_accounting as dpa

    return dpa.ComposedDpEvent([m.event() for m in grouped(mechanisms)])


def epsilon_pld(mechanisms: Sequence[Mechanism], *, delta: float, discretization: float = PLD_DISCRETIZATION) -> float:
    """Tight epsilon of the composition (add/remove neighbours), Poisson sampling only."""
    if not any(m.steps for m in mechanisms):
        return 0.0
    if any(m.sampling != POISSON or m.noise != GAUSSIAN for m in mechanisms):
        raise ConfigError(
            "PLD accounting: expected Poisson-sampled Gaussian steps; use epsilon_rdp for fixed-size "
            "samples and Skellam noise"
        )
    from dp_accounting import pld

    accountant = pld.PLDAccountant(value_discretization_interval=discretization)
    accountant.compose(composed_event(mechanisms))
    return float(accountant.get_epsilon(delta))


def epsilon_rdp(mechanisms: Sequence[Mechanism], *, delta: float) -> float:
    """RDP epsilon; handles fixed-size sampling without replacement (replace-one neighbours)."""
    if not any(m.steps for m in mechanisms):
        return 0.0
    if any(m.noise == SKELLAM for m in mechanisms):
        return _epsilon_rdp_with_skellam(mechanisms, delta=delta)
    import dp_accounting as dpa
    from dp_accounting import rdp

    fixed = any(m.sampling == WITHOUT_REPLACEMENT for m in mechanisms)
    relation = dpa.NeighboringRelation.REPLACE_ONE if fixed else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    with _quiet_absl():
        accountant = rdp.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=relation)
        accountant.compose(composed_event(mechanisms))
        return float(accountant.get_epsilon(delta))


def _epsilon_rdp_with_skellam(mechanisms: Sequence[Mechanism], *, delta: float) -> float:
    """RDP at integer orders: Skellam steps by their bound (common/skellam.py), Gaussian steps by
    dp-accounting (add/remove neighbours, Poisson sampling only), added order by order."""
    import numpy as np
    from dp_accounting import rdp

    from common.skellam import ORDERS, subsampled_skellam_rdp

    if any(m.sampling != POISSON for m in mechanisms):
        raise ConfigError("RDP accounting with Skellam steps: expected Poisson sampling throughout")
    total = np.zeros(len(ORDERS))
    gaussian = [m for m in grouped(mechanisms) if m.noise == GAUSSIAN]
    if gaussian:
        with _quiet_absl():
            accountant = rdp.RdpAccountant(orders=[float(a) for a in ORDERS])
            accountant.compose(composed_event(gaussian))
            total += np.asarray(accountant.rdp)
    for m in grouped(mechanisms):
        if m.noise == SKELLAM:
            one = subsampled_skellam_rdp(
                rate=m.sample_rate, l2=m.l2_sensitivity, l1=m.l1_sensitivity, variance=m.variance
            )
            total += m.steps * np.asarray(one)
    eps, _ = rdp.compute_epsilon(list(ORDERS), total, delta)
    return float(eps)


@contextmanager
def _quiet_absl():
    """dp-accounting's RDP accountant warns through absl for each fractional order whose series
    does not converge (it leaves that order out; the bound still holds): dozens of lines per
    client and round. absl's first warning also gives the root logger a handler, after which
    every Flower log line prints twice. Both are held back here."""
    absl, level, handlers = logging.getLogger("absl"), logging.getLogger("absl").level, logging.root.handlers[:]
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)
        logging.root.handlers[:] = handlers


def epsilon(mechanisms: Sequence[Mechanism], *, delta: float) -> tuple[float, str]:
    """The tightest available epsilon and the accountant that produced it."""
    if all(m.sampling == POISSON and m.noise == GAUSSIAN for m in mechanisms):
        return epsilon_pld(mechanisms, delta=delta), "pld"
    return epsilon_rdp(mechanisms, delta=delta), "rdp"


def smallest_noise(
    eps_of: Callable[[float], float],
    target_epsilon: float,
    *,
    tolerance: float = 1e-3,
    search: Callable[[float], float] | None = None,
) -> float:
    """Smallest noise multiplier z with eps_of(z) <= target (bisection; never overshoots).

    `search`, when given, is a cheaper estimate of eps_of that drives the bisection; its
    answer is then checked with eps_of, and where the estimate was optimistic the bisection
    continues upwards on eps_of itself, so the guarantee always rests on eps_of.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target epsilon: expected a finite value > 0, got {target_epsilon}")
    z = _bisect(search or eps_of, target_epsilon, 0.05, 1.0, tolerance)
    if search is not None and eps_of(z) > target_epsilon:
        z = _bisect(eps_of, target_epsilon, z, z * (1 + 4 * tolerance), tolerance)
    return z


def _bisect(eps_of: Callable[[float], float], target: float, lo: float, hi: float, tolerance: float) -> float:
    """Grow hi until eps_of(hi) <= target, then halve [lo, hi] to `tolerance` relative; returns hi."""
    while eps_of(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(f"target epsilon {target}: unreachable with noise multiplier <= 1e4")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps_of(mid) > target else (lo, mid)
    return hi


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Sample-level noise multiplier whose PLD epsilon after `steps` Poisson steps is <= target.

    The bisection runs on a 10x coarser PLD grid; the answer is verified on the ledger's own grid.
    """

    def eps_at(discretization: float) -> Callable[[float], float]:
        return lambda z: epsilon_pld(
            [Mechanism(noise_multiplier=z, steps=steps, sample_rate=sample_rate)],
            delta=delta,
            discretization=discretization,
        )

    return smallest_noise(eps_at(PLD_DISCRETIZATION), target_epsilon, search=eps_at(10 * PLD_DISCRETIZATION))
