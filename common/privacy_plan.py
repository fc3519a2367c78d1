"""`fedtune plan`: the noise needed for a target (epsilon, delta), before any training.

Sample level: each client runs `steps` DP-SGD steps per round at Poisson rate
1/ceil(n / batch), and is assumed to take part in every round (the worst case).
Client level: `clients_per_round` of `num_clients` are drawn without replacement each round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.privacy import WITHOUT_REPLACEMENT, Mechanism, calibrate_noise, epsilon_pld, epsilon_rdp, smallest_noise


@dataclass(frozen=True)
class Plan:
    sample_noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    client_noise_multiplier: float
    sample_epsilons: list[float]
    client_epsilons: list[float]


def calibrate_client_noise(*, target_epsilon: float, delta: float, rounds: int, population: int,
                           sample_size: int) -> float:
    """Client-level noise multiplier whose RDP epsilon after `rounds` releases is <= target."""
    return smallest_noise(
        lambda z: epsilon_rdp([Mechanism(noise_multiplier=z, steps=rounds, sampling=WITHOUT_REPLACEMENT,
                                         population=population, sample_size=sample_size)], delta=delta),
        target_epsilon,
    )


def make_plan(*, target_epsilon: float, delta: float, rounds: int, num_clients: int, clients_per_round: int,
              local_examples: int, batch_size: int, local_epochs: int = 1, local_steps: int = 0) -> Plan:
    rate = 1.0 / math.ceil(local_examples / batch_size)
    steps = local_steps or local_epochs * math.ceil(local_examples / batch_size)
    sigma = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=rate, steps=steps * rounds)
    z = calibrate_client_noise(target_epsilon=target_epsilon, delta=delta, rounds=rounds, population=num_clients,
                               sample_size=clients_per_round)
    sample_eps = [epsilon_pld([Mechanism(noise_multiplier=sigma, steps=steps * r, sample_rate=rate)], delta=delta)
                  for r in range(1, rounds + 1)]
    client_eps = [epsilon_rdp([Mechanism(noise_multiplier=z, steps=r, sampling=WITHOUT_REPLACEMENT,
                                         population=num_clients, sample_size=clients_per_round)], delta=delta)
                  for r in range(1, rounds + 1)]
    return Plan(sample_noise_multiplier=sigma, sample_rate=rate, steps_per_round=steps, client_noise_multiplier=z,
                sample_epsilons=sample_eps, client_epsilons=client_eps)
