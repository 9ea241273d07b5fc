"""Equivalence checks for trained weights that hold on every CPU kind, and a switch that makes the population
step sum its matmuls in another order, so a test can show it does not depend on one kind's order.

Why relative to the change: two runs of the same arithmetic in another summation order (an AMD EPYC's
AVX512 kernels against a Xeon's AMX ones, or the stacked `baddbmm` against a single net's `addmm`) differ by
float32 rounding that training then carries forward. That difference scales with how far training moved
the weights, not with the weights' size, so a fixed `atol` is either too tight for one kind or too loose
to catch a bug. Measured on a Xeon with the population's matmuls split in two (`summed_in_another_order`):
at most 1.8e-4 of the change (res_mlp, lr 1e-2, 8 epochs); a member whose lr is 1 % off: 2.2e-2.
"""

from __future__ import annotations

import contextlib

import torch

# Largest ||mine - theirs|| / ||theirs - init|| of one tensor that counts as "the same training": ten times
# the rounding seen in another summation order, ten times below a member whose lr is 1 % off.
WEIGHT_REL = 2e-3


def initial_weights(data, config) -> dict:
    """The weights `train(data, config)` starts from (the seeded net, its delta statistics set)."""
    from pipeline.training.trainer import build_net, prepare

    return {k: v.detach().clone() for k, v in build_net(prepare(data, config)).state_dict().items()}


def weight_gaps(mine: dict, theirs: dict, init: dict) -> dict[str, float]:
    """Per floating-point tensor: ||mine - theirs|| / ||theirs - init||, 0 where both are the same tensor.
    A tensor that training never moved must come out bit-identical (its gap is inf otherwise)."""
    assert mine.keys() == theirs.keys()
    gaps = {}
    for key, ref in theirs.items():
        if not ref.is_floating_point():
            assert torch.equal(mine[key], ref), key
            continue
        diff = (mine[key].double() - ref.double()).norm().item()
        moved = (ref.double() - init[key].double()).norm().item()
        gaps[key] = 0.0 if diff == 0 else (diff / moved if moved > 0 else float("inf"))
    return gaps


def assert_weights_follow(mine: dict, theirs: dict, init: dict, rel: float = WEIGHT_REL) -> None:
    gaps = weight_gaps(mine, theirs, init)
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] <= rel, f"{worst}: off by {gaps[worst]:.2e} of its change from init (max {rel:.0e})"


@contextlib.contextmanager
def summed_in_another_order():
    """Run every stacked (population) Linear as two half-matmuls over the inputs and two over the rows: the
    forward sums its inner products in two parts and the weight gradient sums its rows in two parts, as
    another CPU kind's kernels may. The arithmetic is the same; only float32 rounding changes."""
    from pipeline.training import population_steps

    built = population_steps.StackedLinear.forward

    def split_forward(self, x: torch.Tensor) -> torch.Tensor:
        h, r = x.shape[-1] // 2, x.shape[1] // 2

        def rows(part):
            out = torch.baddbmm(self.bias.unsqueeze(1), part[..., :h], self.weight[:, :h])
            return torch.baddbmm(out, part[..., h:], self.weight[:, h:])

        if self.fp32_input and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                x = x.float()
                return torch.cat([rows(x[:, :r]), rows(x[:, r:])], 1)
        return torch.cat([rows(x[:, :r]), rows(x[:, r:])], 1)

    population_steps.StackedLinear.forward = split_forward
    try:
        yield
    finally:
        population_steps.StackedLinear.forward = built
