"""Each of fedtune's reaches into Opacus' internals (common/opacus.py), checked against the installed
Opacus on a small model: an upgrade that renames or drops one fails here, by name.

RELIABILITY privacy accounting: accountant state (an accountant given a history equals one that
stepped through it); a DP step that fails part-way leaves nothing behind (its skip signals,
forward counts, saved activations, clipped sums).
"""

from __future__ import annotations

import pytest
import torch

from common.opacus import (
    DPOptimizer, GradSampleModule, PRVAccountant, RDPAccountant, accountant_with_history, clipped_sum,
    drop_clipped_sums, drop_pending_skips, empty_grad_samples, forget_activations, grad_samples_in_param_dtype,
    remove_hooks, reset_forward_counters,
)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    gsm = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                            expected_batch_size=4)
    return model, gsm, optimizer


def skipped_chunk(gsm, optimizer, n: int = 4) -> None:
    loss = gsm(torch.randn(n, 4)).sum()
    loss.backward()
    optimizer.signal_skip_step(do_skip=True)
    optimizer.step()


def test_pending_skip_signals_are_dropped_and_zero_grad_then_clears_the_clipped_sums():
    _, gsm, optimizer = setup()
    optimizer.signal_skip_step(do_skip=True)
    assert len(optimizer._step_skip_queue) == 1
    optimizer._step_skip_queue.clear()
    skipped_chunk(gsm, optimizer)
    assert optimizer._is_last_step_skipped and all(clipped_sum(p) is not None for p in optimizer.params)
    optimizer.zero_grad(set_to_none=True)
    assert all(clipped_sum(p) is not None for p in optimizer.params)  # a skipped step keeps its sums
    optimizer.signal_skip_step(do_skip=True)
    drop_pending_skips(optimizer)
    assert len(optimizer._step_skip_queue) == 0 and not optimizer._is_last_step_skipped
    optimizer.zero_grad(set_to_none=True)
    assert all(clipped_sum(p) is None for p in optimizer.params)


def test_forward_counters_and_saved_activations_of_an_unfinished_pass_are_forgotten():
    _, gsm, optimizer = setup()
    gsm(torch.randn(5, 4))  # a forward pass whose backward never comes
    assert all(p._forward_counter == 1 for p in optimizer.params)
    assert any("activations" in m.__dict__ for m in gsm.modules())
    reset_forward_counters(optimizer)
    forget_activations(gsm)
    assert all(p._forward_counter == 0 for p in optimizer.params)
    assert not any("activations" in m.__dict__ or "max_batch_len" in m.__dict__ for m in gsm.modules())
    skipped_chunk(gsm, optimizer, n=3)  # the next pass is sized by its own batch, not the forgotten one
    assert all(clipped_sum(p).shape == p.shape for p in optimizer.params)


def test_clipped_sums_are_the_clipped_per_sample_gradients_and_can_be_dropped():
    model, gsm, optimizer = setup()
    x = torch.randn(4, 4)
    loss = gsm(x).sum()
    loss.backward()
    samples = [p.grad_sample.clone() for p in optimizer.params]
    norms = torch.cat([s.flatten(1) for s in samples], dim=1).norm(dim=1)
    factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    optimizer.signal_skip_step(do_skip=True)
    optimizer.step()
    for p, s in zip(optimizer.params, samples):
        torch.testing.assert_close(clipped_sum(p), torch.einsum("i,i...->...", factor, s))
    drop_clipped_sums(model.parameters())
    assert all(clipped_sum(p) is None and p.grad is None for p in model.parameters())


def test_per_sample_gradients_return_to_the_parameters_dtype_and_empty_ones_release_the_step():
    _, gsm, optimizer = setup()
    skipped_chunk(gsm, optimizer)
    for p in optimizer.params:
        p.grad_sample = torch.zeros((2, *p.shape), dtype=torch.bfloat16)
    grad_samples_in_param_dtype(optimizer)
    assert all(p.grad_sample.dtype == torch.float32 for p in optimizer.params)
    before = [p.detach().clone() for p in optimizer.params]
    empty_grad_samples(optimizer)
    assert all(p.grad_sample.shape == (0, *p.shape) for p in optimizer.params)
    optimizer.step()  # noises (here with zero noise) and applies what the chunk accumulated
    assert any(not torch.equal(p, b) for p, b in zip(optimizer.params, before))


def test_removing_the_hooks_leaves_the_model_computing_no_per_sample_gradients():
    model, gsm, _ = setup()
    remove_hooks(gsm)
    model(torch.randn(3, 4)).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert all(not hasattr(p, "_forward_counter") for p in model.parameters())


@pytest.mark.parametrize("kind", [PRVAccountant, RDPAccountant])
def test_an_accountant_given_a_history_equals_one_that_stepped_through_it(kind):
    stepped = kind()
    for _ in range(40):
        stepped.step(noise_multiplier=1.1, sample_rate=0.05)
    given = accountant_with_history(kind(), [(1.1, 0.05, 40)])
    assert given.get_epsilon(1e-5) == pytest.approx(stepped.get_epsilon(1e-5), rel=1e-6)
