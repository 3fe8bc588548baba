"""Property-based fuzzing of the public API against the slow references (needs ``hypothesis``).

Used by ``tests/test_testing.py`` (a quick profile inside ``make test``) and ``tools/fuzz.py``
(``make fuzz``: 10,000+ cases). One case draws a random problem — N, C, H, W (1x1 maps and maps
smaller than the levels included), level set, mode, dtype, scale, memory layout, and boxes that are
ordinary, degenerate, inverted, partly or wholly outside the image, huge, or spread over every image
of the batch (or none at all) — runs one public function and compares it with its oracle:

* ``roi_pool`` / ``roi_spp_pool`` / ``multilevel_roi_spp_pool``: ``reference.roi_pool_reference``
  (loops; max must match exactly, avg to float tolerance) and, for float32/float64 max without NaN,
  ``torchvision.ops.roi_pool`` bit for bit;
* ``spp_pool``: per-image ``F.adaptive_*_pool2d`` (``reference.spp_pool_reference``).
"""

from __future__ import annotations

import dataclasses

import torch
import torchvision

import spp_triton
from spp_triton import bins, reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LEVEL_CHOICES = ((1, 2, 4), (1, 2, 3, 6), (4, 2, 1), (2, 3), (1,), (7,), (5, 3), (14,), (1, 2, 7))


@dataclasses.dataclass
class Case:
    op: str
    n: int
    c: int
    h: int
    w: int
    levels: tuple[int, ...]
    mode: str
    dtype: torch.dtype
    scale: float
    layout: str
    num_boxes: int
    box_kind: str
    seed: int
    nan: bool


def case_strategy():
    from hypothesis import strategies as st

    return st.builds(
        Case,
        op=st.sampled_from(["roi_spp_pool", "roi_pool", "spp_pool", "multilevel"]),
        n=st.integers(1, 3),
        c=st.integers(1, 4),
        h=st.integers(1, 13),
        w=st.integers(1, 13),
        levels=st.sampled_from(LEVEL_CHOICES),
        mode=st.sampled_from(["max", "avg"]),
        dtype=st.sampled_from(DTYPES),
        scale=st.sampled_from([1.0, 0.5, 0.25, 1 / 16, 0.3, 2.0]),
        layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
        num_boxes=st.integers(0, 10),
        box_kind=st.sampled_from(
            ["mixed", "inside", "outside", "degenerate", "huge", "every_image"]
        ),
        seed=st.integers(0, 2**31 - 1),
        nan=st.booleans(),
    )


def make_input(case: Case, gen: torch.Generator) -> torch.Tensor:
    base = torch.randn(case.n, case.c * 2, case.h, case.w * 2, generator=gen, dtype=torch.float64)
    if case.nan and case.mode == "max":
        mask = torch.rand(base.shape, generator=gen) < 0.02
        base = base.masked_fill(mask, float("nan"))
    base = base.to(case.dtype)
    if case.layout == "channels_last":
        return base[:, : case.c, :, : case.w].contiguous().to(memory_format=torch.channels_last)
    if case.layout == "strided":
        return base[:, ::2, :, ::2]
    return base[:, : case.c, :, : case.w].contiguous()


def make_boxes(case: Case, gen: torch.Generator) -> torch.Tensor:
    k = case.num_boxes
    img_h, img_w = case.h / case.scale, case.w / case.scale

    def u(lo, hi, size):
        return torch.rand(size, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    kind = case.box_kind
    if kind == "huge":
        xy = u(-1e7, 1e7, (k, 4))
    elif kind == "outside":
        xy = u(img_w * 1.5, img_w * 3 + 10, (k, 4))
    elif kind == "inside":
        xy = torch.stack([u(0, img_w, k), u(0, img_h, k), u(0, img_w, k), u(0, img_h, k)], 1)
    else:
        xy = torch.stack(
            [
                u(-img_w / 2, img_w * 1.5, k),
                u(-img_h / 2, img_h * 1.5, k),
                u(-img_w / 2, img_w * 1.5, k),
                u(-img_h / 2, img_h * 1.5, k),
            ],
            1,
        )
    if kind == "degenerate":
        xy[:, 2:] = xy[:, :2]
    elif kind != "mixed":  # ordered corners; "mixed" keeps inverted boxes
        xy = torch.stack(
            [
                torch.minimum(xy[:, 0], xy[:, 2]),
                torch.minimum(xy[:, 1], xy[:, 3]),
                torch.maximum(xy[:, 0], xy[:, 2]),
                torch.maximum(xy[:, 1], xy[:, 3]),
            ],
            1,
        )
    if kind == "every_image":
        batch = torch.arange(k, dtype=torch.float64) % case.n
    else:
        batch = torch.randint(0, case.n, (k,), generator=gen).to(torch.float64)
    bin_dtype = bins.bin_dtype_for(case.dtype)
    return torch.cat([batch[:, None], xy], 1).to(bin_dtype)


def _assert_match(ours: torch.Tensor, ref: torch.Tensor, case: Case, what: str) -> None:
    if ours.shape != ref.shape or ours.dtype != ref.dtype:
        raise AssertionError(
            f"{what}: shape/dtype {ours.shape} {ours.dtype} vs {ref.shape} {ref.dtype} for {case}"
        )
    same_nan = torch.equal(ours.isnan(), ref.isnan())
    if case.mode == "max":
        ok = same_nan and torch.equal(ours.nan_to_num(0.0), ref.nan_to_num(0.0))
    else:
        tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[
            case.dtype
        ]
        ok = same_nan and torch.allclose(
            ours.double().nan_to_num(0.0), ref.double().nan_to_num(0.0), atol=tol, rtol=tol
        )
    if not ok:
        diff = (ours.double() - ref.double()).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: mismatch (max abs diff {diff}) for {case}")


def check_case(case: Case) -> None:
    """Run one case through the public API and compare with its oracle; raise on mismatch."""
    gen = torch.Generator().manual_seed(case.seed)
    x = make_input(case, gen)
    if case.op == "spp_pool":
        sizes = torch.stack(
            [
                torch.randint(1, case.h + 1, (case.n,), generator=gen),
                torch.randint(1, case.w + 1, (case.n,), generator=gen),
            ],
            1,
        )
        ours = spp_triton.spp_pool(x, case.levels, case.mode, sizes)
        _assert_match(
            ours, reference.spp_pool_reference(x, case.levels, case.mode, sizes), case, "spp_pool"
        )
        return
    rois = make_boxes(case, gen)
    if case.op == "roi_pool":
        n = case.levels[0]
        ours = spp_triton.roi_pool(x, rois, n, case.scale, case.mode)
        ref = reference.roi_pool_reference(x, rois, n, case.scale, case.mode)
        _assert_match(ours, ref, case, "roi_pool")
        if (
            case.mode == "max"
            and case.dtype in (torch.float32, torch.float64)
            and not case.nan
            and case.box_kind != "huge"
        ):
            tv = torchvision.ops.roi_pool(x, rois.to(x.dtype), n, case.scale)
            _assert_match(ours, tv, case, "roi_pool vs torchvision")
        return
    if case.op == "roi_spp_pool":
        ours = spp_triton.roi_spp_pool(x, rois, case.levels, case.scale, case.mode)
        ref = reference.roi_spp_pool_reference(x, rois, case.levels, case.scale, case.mode)
        _assert_match(ours, ref, case, "roi_spp_pool")
        return
    # multilevel: a second, coarser map at half the scale
    x2 = x[:, :, ::2, ::2]
    index = torch.randint(0, 2, (rois.shape[0],), generator=gen)
    ours = spp_triton.multilevel_roi_spp_pool(
        [x, x2], rois, index, [case.scale, case.scale / 2], case.levels, case.mode
    )
    ref = torch.zeros_like(ours)
    for f, (feat, s) in enumerate(((x, case.scale), (x2, case.scale / 2))):
        sel = index == f
        ref[sel] = reference.roi_spp_pool_reference(feat, rois[sel], case.levels, s, case.mode)
    _assert_match(ours, ref, case, "multilevel_roi_spp_pool")
