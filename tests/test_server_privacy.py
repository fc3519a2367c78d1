"""Client-level DP on the server (RELIABILITY bad inputs: NaN/Inf update, a zero-norm update
under DP clipping; weights are the server's policy, not the client's claim)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message

from common.config import FedtuneConfig
from common.ledger import Ledger
from server.validation import Policy, ValidatedStrategy
from server.privacy import federation_entry
from simulation.cli import main as cli_main
from tests.flower_messages import train_reply
from tests.reliability import count

CURRENT = {"w": np.zeros((3, 2), np.float32)}


def reply(value: float, examples: int, node: int) -> Message:
    return train_reply(node, {"w": np.full((3, 2), value, np.float32)}, examples=examples)


def test_flowers_clipping_divides_by_zero_on_a_zero_norm_update():
    from flwr.supercore.differential_privacy import compute_clip_model_update

    with pytest.raises(ZeroDivisionError):
        compute_clip_model_update([np.zeros(3)], [np.zeros(3)], clipping_norm=1.0)


@pytest.mark.parametrize("value, reason", [(float("nan"), "non-finite"), (float("inf"), "non-finite"),
                                           (0.0, "zero-norm-update")])
def test_bad_updates_are_rejected_before_clipping_and_weights_are_equal(value, reason):
    wrapper = ValidatedStrategy(None, initial=CURRENT, policy=Policy(uniform_weights=True, reject_zero_norm=True),
                                clients={}, declared={})
    verdicts = wrapper.validate(1, [reply(0.5, 10, 1), reply(value, 10_000, 2), reply(0.25, 999, 3)])
    assert [v.reason for v in verdicts if v.reason] == [reason]
    assert [v.weight for v in verdicts if v.reason is None] == [1.0, 1.0]  # equal weights for DP-FedAvg


def test_federation_entry_accounts_the_effective_noise_of_a_short_round():
    cfg = FedtuneConfig(dp_client="server-fixed", dp_client_noise_multiplier=1.0)
    ledger = Ledger()
    full = ledger.append(federation_entry(ledger, cfg, server_round=1, population=10, sampled=4, accepted=4,
                                          clipping_norm=0.5, noise_denominator=4))
    short = federation_entry(Ledger(), cfg, server_round=1, population=10, sampled=4, accepted=2,
                             clipping_norm=0.5, noise_denominator=4)
    assert full["effective_noise_multiplier"] == 1.0 and short["effective_noise_multiplier"] == 0.5
    assert short["epsilon"] > full["epsilon"]  # less effective noise costs more privacy
    none = federation_entry(ledger, cfg, server_round=2, population=10, sampled=4, accepted=0,
                            clipping_norm=0.5, noise_denominator=4)
    assert none["mechanism"] is None and none["epsilon"] == full["epsilon"]


def test_plan_command_prints_both_noise_multipliers(capsys):
    code = cli_main(["plan", "--target-epsilon", "2", "--rounds", "3", "--num-clients", "10",
                     "--clients-per-round", "5", "--local-examples", "400", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "dp-noise-multiplier =" in out and "dp-client-noise-multiplier =" in out


def test_plan_command_shows_noise_to_signal_and_flags_a_batch_that_drowns_it(capsys):
    """The old default (batch 16 on 1,800 examples at epsilon 8) is flagged with a batch that fixes it."""
    code = cli_main(["plan", "--target-epsilon", "8", "--rounds", "3", "--num-clients", "4",
                     "--clients-per-round", "4", "--local-examples", "1800", "--batch-size", "16",
                     "--trainable", "74498"])
    out = capsys.readouterr().out
    assert code == 0
    assert "noise/signal sigma*sqrt(d)/B = 8.686" in out and "4.343 averaged over 4 clients" in out
    assert "the noise drowns the signal" in out
    assert "225" not in out.split("other")[0]  # an explicit batch is taken as given
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│") and "│" in line[1:]}
    assert "fine" in rows["256"] and "noise drowns signal" in rows["16*"]


@pytest.mark.parametrize("args, message", [
    (["--clients-per-round", "5", "--local-examples", "1800"], "--clients-per-round: expected at most --num-clients (4), got 5"),
    (["--clients-per-round", "4", "--local-examples", "0"], "--local-examples: expected a value >= 1, got 0"),  # was a ZeroDivisionError
])
def test_plan_command_refuses_impossible_federations(capsys, args, message):
    code = cli_main(["plan", "--target-epsilon", "3", "--rounds", "3", "--num-clients", "4", "--trainable", "100", *args])
    assert code == 2 and message in capsys.readouterr().err
    count("bad_inputs_rejected", f"fedtune plan {' '.join(args)}")
