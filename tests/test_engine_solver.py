"""spp_triton.engine.solver.ClippedSGD: SGD after per-parameter clipping, as detectron2's yacs
SOLVER.CLIP_GRADIENTS does."""

from __future__ import annotations

import pytest
import torch

from spp_triton.engine.solver import ClippedSGD


def _params(gen):
    a = torch.nn.Parameter(torch.randn(3, 4, generator=gen))
    b = torch.nn.Parameter(torch.randn(5, generator=gen))
    a.grad = torch.randn(3, 4, generator=gen) * 10
    b.grad = torch.randn(5, generator=gen) * 0.01
    return a, b


@pytest.mark.parametrize("clip_type", ["norm", "value"])
def test_step_equals_clipping_then_sgd(clip_type):
    gen = torch.Generator().manual_seed(0)
    ours = _params(gen)
    gen = torch.Generator().manual_seed(0)
    ref = _params(gen)
    ClippedSGD(ours, lr=0.1, momentum=0.9, clip_type=clip_type, clip_value=1.0).step()
    for p in ref:  # clipped one parameter at a time
        if clip_type == "norm":
            torch.nn.utils.clip_grad_norm_(p, 1.0)
        else:
            torch.nn.utils.clip_grad_value_(p, 1.0)
    torch.optim.SGD(ref, lr=0.1, momentum=0.9).step()
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
    assert ours[0].grad.abs().max() <= 1.0 + 1e-6  # the large gradient was clipped
    assert torch.equal(ours[1].grad, ref[1].grad)  # the small one untouched


@pytest.mark.parametrize(
    "kwargs,words", [({"clip_type": "l2"}, "clip_type"), ({"clip_value": 0.0}, "clip_value")]
)
def test_bad_settings_name_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ClippedSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, **kwargs)
