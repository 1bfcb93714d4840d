"""Linear's converted weight (a float32 router's): kept between steps, renewed when the
weight changes."""

from __future__ import annotations

import torch

from engine.layers.params import Linear


def test_converted_weight_is_kept_until_the_weight_changes():
    lin = Linear(8, 4).to(torch.bfloat16)
    lin.weight.loader(lin.weight, torch.randn(4, 8).bfloat16(), None)
    first = lin.weight_in(torch.float32)
    assert first.dtype == torch.float32 and torch.equal(first, lin.weight.float())
    assert lin.weight_in(torch.float32) is first                 # no conversion per call
    lin.weight.loader(lin.weight, torch.randn(4, 8).bfloat16(), None)    # reloaded in place
    second = lin.weight_in(torch.float32)
    assert second is not first and torch.equal(second, lin.weight.float())
    assert lin.weight_in(torch.bfloat16) is lin.weight
