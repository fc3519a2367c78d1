"""DP-SGD settings before any training: batch, rate, steps, noise, and whether the result can learn.

Sample level: each client runs DP-SGD at Poisson rate 1/ceil(n / batch) (the rate Opacus'
DPDataLoader uses), `steps` logical steps per round, and is assumed to take part in every round
(the worst case). Client level: `clients_per_round` of `num_clients` are drawn without
replacement each round.

Whether a setting can learn: DP-SGD adds Gaussian noise of standard deviation sigma * C to the
sum of the clipped per-sample gradients and divides by the expected batch B, so the averaged
gradient carries noise sigma * C / B per coordinate and noise of norm about sigma * C * sqrt(d) / B
over the d trainable values, while its signal is at most C. The ratio sigma * sqrt(d) / B is what
decides (Li et al. 2021, https://arxiv.org/abs/2110.05679, train with batches of about 1000 for
that reason). FedAvg then averages K clients' independent noise, dividing the ratio by sqrt(K).
bench/README.md has the measurements behind the limits below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.privacy import WITHOUT_REPLACEMENT, Mechanism, calibrate_noise, epsilon_pld, epsilon_rdp, smallest_noise

AUTO_STEPS_PER_EPOCH = 8  # dp-batch-size = 0: an expected batch of n / 8, so 8 logical steps a local epoch,
AUTO_MAX_BATCH = 1024  # up to Li et al.'s batch of about 1000
NOISE_TO_SIGNAL_LIMIT = 0.5  # averaged noise / signal above this: the noise drowns the update
WEAK_NOISE_LIMIT = 0.5  # noise multiplier below this: the budget goes on many steps of weak noise


def dp_batch_size(configured: int, examples: int) -> int:
    """The DP-SGD batch a client with `examples` training examples uses: `configured`, or when
    that is 0, examples / 8 capped at 1024 (8 logical steps a local epoch)."""
    if configured > 0:
        return configured
    return max(1, min(AUTO_MAX_BATCH, examples // AUTO_STEPS_PER_EPOCH))


def poisson_rate(batch_size: int, examples: int) -> float:
    """The rate Opacus' DPDataLoader uses for a loader of this batch size (1 / len(loader))."""
    return 1.0 / math.ceil(examples / batch_size)


def steps_per_round(*, batch_size: int, examples: int, local_epochs: int, local_steps: int) -> int:
    """Logical DP-SGD steps per round: local-steps, or local-epochs passes at the Poisson rate."""
    return local_steps or local_epochs * math.ceil(examples / batch_size)


@dataclass(frozen=True)
class SampleLevelPlan:
    """One client's DP-SGD mechanism for a whole run, and what its noise does to the update."""

    examples: int
    batch_size: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    clipping_norm: float
    trainable: int  # d: the adapter's trainable values
    clients_per_round: int

    @property
    def expected_batch(self) -> float:
        return self.sample_rate * self.examples

    @property
    def noise_std(self) -> float:
        """Per-coordinate noise on the averaged gradient: sigma * C / B."""
        return self.noise_multiplier * self.clipping_norm / self.expected_batch

    @property
    def noise_to_signal(self) -> float:
        """Noise norm over the largest signal norm of one client's averaged gradient: sigma sqrt(d) / B."""
        return self.noise_multiplier * math.sqrt(self.trainable) / self.expected_batch

    @property
    def averaged_noise_to_signal(self) -> float:
        """The same after the server averages `clients_per_round` clients' independent noise."""
        return self.noise_to_signal / math.sqrt(max(1, self.clients_per_round))

    def verdicts(self) -> list[str]:
        """Short names of the problems: 'noise drowns signal', 'weak noise'; empty when fine."""
        return [
            name
            for name, ok in (
                ("noise drowns signal", self.averaged_noise_to_signal <= NOISE_TO_SIGNAL_LIMIT),
                ("weak noise", self.noise_multiplier >= WEAK_NOISE_LIMIT),
            )
            if not ok
        ]

    def problems(self) -> list[str]:
        """Why this setting wastes budget or cannot learn, with its numbers; empty when it is fine."""
        found = []
        if "noise drowns signal" in self.verdicts():
            found.append(
                f"the noise drowns the signal: noise/signal {self.noise_to_signal:.2f} per client, "
                f"{self.averaged_noise_to_signal:.2f} averaged over {self.clients_per_round} clients "
                f"(above {NOISE_TO_SIGNAL_LIMIT}; runs there stayed at the majority class)"
            )
        if "weak noise" in self.verdicts():
            found.append(
                f"noise multiplier {self.noise_multiplier:.3f} is below {WEAK_NOISE_LIMIT}: the budget goes on "
                f"{self.steps_per_round * self.rounds} steps of weak noise; a larger batch buys stronger noise per step"
            )
        return found


def sample_level_plan(
    *,
    examples: int,
    batch_size: int,
    local_epochs: int,
    local_steps: int,
    rounds: int,
    clipping_norm: float,
    trainable: int,
    clients_per_round: int,
    delta: float,
    target_epsilon: float = 0.0,
    noise_multiplier: float = 0.0,
) -> SampleLevelPlan:
    """The plan for one client: the given noise multiplier, or the one calibrated so that `rounds`
    rounds meet `target_epsilon` (PLD)."""
    batch = dp_batch_size(batch_size, examples)
    rate = poisson_rate(batch, examples)
    steps = steps_per_round(batch_size=batch, examples=examples, local_epochs=local_epochs, local_steps=local_steps)
    sigma = noise_multiplier or calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=rate, steps=steps * rounds
    )
    return SampleLevelPlan(
        examples=examples,
        batch_size=batch,
        sample_rate=rate,
        steps_per_round=steps,
        rounds=rounds,
        noise_multiplier=sigma,
        clipping_norm=clipping_norm,
        trainable=trainable,
        clients_per_round=clients_per_round,
    )


def plan_for_config(cfg, examples: int, *, trainable: int, clients_per_round: int) -> SampleLevelPlan:
    """`sample_level_plan` with a run's settings (a FedtuneConfig)."""
    return sample_level_plan(
        examples=examples,
        batch_size=cfg.dp_batch_size,
        local_epochs=cfg.local_epochs,
        local_steps=cfg.local_steps,
        rounds=cfg.num_server_rounds,
        clipping_norm=cfg.dp_clipping_norm,
        trainable=trainable,
        clients_per_round=clients_per_round,
        delta=cfg.dp_delta,
        target_epsilon=cfg.dp_target_epsilon,
        noise_multiplier=cfg.dp_noise_multiplier,
    )


def batch_alternatives(
    plan: SampleLevelPlan, *, target_epsilon: float, delta: float, local_epochs: int, local_steps: int
) -> list[SampleLevelPlan]:
    """The same run at other batch sizes (powers of two from 32 up to the client's examples),
    each with the noise calibrated for the same target."""
    sizes, b = [], 32
    while b < plan.examples:
        sizes.append(b)
        b *= 2
    sizes.append(plan.examples)
    return [
        sample_level_plan(
            examples=plan.examples,
            batch_size=b,
            local_epochs=local_epochs,
            local_steps=local_steps,
            rounds=plan.rounds,
            clipping_norm=plan.clipping_norm,
            trainable=plan.trainable,
            clients_per_round=plan.clients_per_round,
            delta=delta,
            target_epsilon=target_epsilon,
        )
        for b in sizes
        if b != plan.batch_size
    ]


def suggested(alternatives: list[SampleLevelPlan]) -> SampleLevelPlan | None:
    """The smallest batch among the alternatives that has none of the problems (more steps for
    the same budget), or None if every one has some."""
    fine = [p for p in alternatives if not p.problems()]
    return min(fine, key=lambda p: p.batch_size) if fine else None


@dataclass(frozen=True)
class Plan:
    sample: SampleLevelPlan
    client_noise_multiplier: float
    rounds_shown: list[int]  # every round up to 20, else about ten of them and the last
    sample_epsilons: list[float]  # after each of rounds_shown
    client_epsilons: list[float]
    alternatives: list[SampleLevelPlan] = field(default_factory=list)


def calibrate_client_noise(
    *, target_epsilon: float, delta: float, rounds: int, population: int, sample_size: int
) -> float:
    """Client-level noise multiplier whose RDP epsilon after `rounds` releases is <= target."""
    return smallest_noise(
        lambda z: epsilon_rdp(
            [
                Mechanism(
                    noise_multiplier=z,
                    steps=rounds,
                    sampling=WITHOUT_REPLACEMENT,
                    population=population,
                    sample_size=sample_size,
                )
            ],
            delta=delta,
        ),
        target_epsilon,
    )


def shown_rounds(rounds: int) -> list[int]:
    """The rounds a plan's epsilon table shows: each of up to 20, else round 1, every tenth and the last."""
    if rounds <= 20:
        return list(range(1, rounds + 1))
    return sorted({1, *range(rounds // 10, rounds + 1, rounds // 10), rounds})


def make_plan(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    num_clients: int,
    clients_per_round: int,
    local_examples: int,
    trainable: int,
    batch_size: int = 0,
    local_epochs: int = 1,
    local_steps: int = 0,
    clipping_norm: float = 1.0,
    alternatives: bool = True,
) -> Plan:
    """`fedtune plan`: the sample-level plan with its epsilon per round and, when it has problems
    (or `alternatives`), the same run at other batch sizes; the client-level noise and epsilons."""
    sample = sample_level_plan(
        examples=local_examples,
        batch_size=batch_size,
        local_epochs=local_epochs,
        local_steps=local_steps,
        rounds=rounds,
        clipping_norm=clipping_norm,
        trainable=trainable,
        clients_per_round=clients_per_round,
        delta=delta,
        target_epsilon=target_epsilon,
    )
    z = calibrate_client_noise(
        target_epsilon=target_epsilon, delta=delta, rounds=rounds, population=num_clients, sample_size=clients_per_round
    )
    shown = shown_rounds(rounds)
    sample_eps = [
        epsilon_pld(
            [
                Mechanism(
                    noise_multiplier=sample.noise_multiplier,
                    steps=sample.steps_per_round * r,
                    sample_rate=sample.sample_rate,
                )
            ],
            delta=delta,
        )
        for r in shown
    ]
    client_eps = [
        epsilon_rdp(
            [
                Mechanism(
                    noise_multiplier=z,
                    steps=r,
                    sampling=WITHOUT_REPLACEMENT,
                    population=num_clients,
                    sample_size=clients_per_round,
                )
            ],
            delta=delta,
        )
        for r in shown
    ]
    others = (
        batch_alternatives(
            sample, target_epsilon=target_epsilon, delta=delta, local_epochs=local_epochs, local_steps=local_steps
        )
        if alternatives or sample.problems()
        else []
    )
    return Plan(
        sample=sample,
        client_noise_multiplier=z,
        rounds_shown=shown,
        sample_epsilons=sample_eps,
        client_epsilons=client_eps,
        alternatives=others,
    )


# --- Distributed DP: one DP-SGD step a round over the federation's data -------------------------

ROUNDING_HEADROOM = 100.0  # s * C = 100 sqrt(d): rounding adds at most 1% to the L2 sensitivity


@dataclass(frozen=True)
class DistributedPlan:
    """Distributed DP-SGD for a whole run (Kairouz et al. 2021; Agarwal et al. 2021): each round every
    client Poisson-samples its records at `sample_rate`, sums their clipped gradients, scales the sum by
    `scale`, rounds it and adds Skellam noise of variance `variance / threshold`; the secure sum of
    at least `threshold` clients carries variance `variance`, i.e. noise_multiplier * l2_sensitivity. The
    server divides by the expected batch and steps AdamW. One round is one DP-SGD step."""

    examples: int  # training records across the federation
    batch_size: int  # expected Poisson batch across the federation
    rounds: int
    noise_multiplier: float  # of the summed noise, relative to the L2 sensitivity of the rounded sum
    clipping_norm: float
    dimension: int  # d: the values that travel
    scale: float

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.batch_size / self.examples)

    @property
    def sensitivities(self) -> tuple[float, float]:
        from common.skellam import sensitivities

        return sensitivities(scale=self.scale, clipping_norm=self.clipping_norm, dimension=self.dimension)

    @property
    def variance(self) -> float:
        return (self.noise_multiplier * self.sensitivities[0]) ** 2

    def mechanism(self, steps: int = 1) -> Mechanism:
        from common.privacy import SKELLAM

        l2, l1 = self.sensitivities
        return Mechanism(
            noise_multiplier=self.noise_multiplier,
            steps=steps,
            sample_rate=self.sample_rate,
            noise=SKELLAM,
            l2_sensitivity=l2,
            l1_sensitivity=l1,
        )

    @property
    def gradient_noise_std(self) -> float:
        """Per-coordinate noise on the averaged gradient the server steps with: sqrt(variance) / (s B)."""
        return self.noise_multiplier * self.sensitivities[0] / (self.scale * self.batch_size)

    @property
    def noise_to_signal(self) -> float:
        """Noise norm over the largest signal norm of the averaged gradient (as for local DP-SGD)."""
        return self.gradient_noise_std * math.sqrt(self.dimension) / self.clipping_norm


def distributed_scale(*, dimension: int, clipping_norm: float, batch_size: int) -> float:
    """The integer scale s of a client's clipped-gradient sum: s C = ROUNDING_HEADROOM sqrt(d), so that
    rounding adds at most 1% to the sensitivity, unless a batch far above the expected one could then
    leave the secure sum's +-M/2 (a coordinate of the sum is at most batch * s * C): s C is kept
    under M / (8 (B + 10 sqrt(B) + 10)), which leaves three quarters of the range to the noise."""
    from common.secagg import MODULUS

    high = batch_size + 10 * math.sqrt(batch_size) + 10
    return min(ROUNDING_HEADROOM * math.sqrt(dimension), MODULUS / (8 * high)) / clipping_norm


def distributed_plan(
    *,
    examples: int,
    batch_size: int,
    rounds: int,
    clipping_norm: float,
    dimension: int,
    delta: float,
    target_epsilon: float = 0.0,
    noise_multiplier: float = 0.0,
    canaries: int = 0,
) -> DistributedPlan:
    """The plan for a run: the given noise multiplier, or the smallest whose Skellam epsilon after
    `rounds` steps meets `target_epsilon` (common/skellam.py). `canaries` (expected included, over
    the federation) are drawn at the examples' rate into the same sum: the integer scale leaves
    room for them too."""
    from common.privacy import epsilon_rdp

    batch = dp_batch_size(batch_size, examples)
    records = batch + math.ceil(batch * canaries / examples)
    scale = distributed_scale(dimension=dimension, clipping_norm=clipping_norm, batch_size=records)

    def plan(z: float) -> DistributedPlan:
        return DistributedPlan(
            examples=examples,
            batch_size=batch,
            rounds=rounds,
            noise_multiplier=z,
            clipping_norm=clipping_norm,
            dimension=dimension,
            scale=scale,
        )

    if not noise_multiplier:
        noise_multiplier = smallest_noise(
            lambda z: epsilon_rdp([plan(z).mechanism(steps=rounds)], delta=delta), target_epsilon
        )
    return plan(noise_multiplier)


def distributed_plan_for_config(cfg, examples: int, *, dimension: int, canaries: int = 0) -> DistributedPlan:
    """`distributed_plan` with a run's settings (a FedtuneConfig)."""
    return distributed_plan(
        examples=examples,
        batch_size=cfg.dp_batch_size,
        rounds=cfg.num_server_rounds,
        clipping_norm=cfg.dp_clipping_norm,
        dimension=dimension,
        delta=cfg.dp_delta,
        target_epsilon=cfg.dp_target_epsilon,
        noise_multiplier=cfg.dp_noise_multiplier,
        canaries=canaries,
    )
