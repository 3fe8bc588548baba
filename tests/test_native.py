"""spp_triton.native: building, caching and loading the compiled CPU max kernel, its fallbacks,
and the kernel itself against the torchvision path on awkward inputs (special values, channel
counts around its 4-channel blocks, edges past the map, bad batch indices).

Results through ``spp_triton.cpu`` on both paths are in ``test_cpu.py``."""

from __future__ import annotations

import zlib

import pytest
import torch

from spp_triton import bins, cpu, native

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty build folder and no library loaded yet in this process."""
    monkeypatch.setenv("SPP_TRITON_NATIVE_DIR", str(tmp_path))
    monkeypatch.delenv("SPP_TRITON_NATIVE", raising=False)
    native._library.cache_clear()
    yield tmp_path
    native._library.cache_clear()


@needs_compiler
def test_builds_once_into_the_cache_folder_and_reuses_it(fresh):
    assert native.roi_max_kernel(torch.float32) is not None
    assert native.roi_max_kernel(torch.float64) is not None
    built = list(fresh.glob("roi_max-*.so"))
    assert len(built) == 1 and not list(fresh.glob("*.so.*"))  # no temporary left behind
    stamp = built[0].stat().st_mtime_ns
    native._library.cache_clear()
    assert native.roi_max_kernel(torch.float32) is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded again, not rebuilt


def test_other_dtypes_have_no_kernel(fresh):
    assert native.roi_max_kernel(torch.float16) is None
    assert native.roi_max_kernel(torch.bfloat16) is None


def test_switched_off_builds_nothing_and_says_nothing(fresh, monkeypatch, recwarn):
    monkeypatch.setenv("SPP_TRITON_NATIVE", "0")
    assert native.roi_max_kernel(torch.float32) is None
    assert not list(fresh.iterdir())
    assert not recwarn.list


def test_without_a_compiler_it_warns_once_and_the_cpu_path_still_pools(fresh, monkeypatch, gen):
    monkeypatch.setenv("CC", "no-such-compiler-spp")
    with pytest.warns(UserWarning, match="no C compiler"):
        assert native.roi_max_kernel(torch.float32) is None
    x = torch.randn(1, 2, 6, 7, generator=gen)
    x[0, 0, 2, 3] = float("nan")
    rois = torch.tensor([[0.0, 0.0, 0.0, 6.0, 5.0]])
    out, _ = cpu.pyramid_pool_forward([x], rois, None, [1.0], [(1, 1)], "max", "roi")
    assert out[0, 0].isnan() and out[0, 1] == x[0, 1].amax()


@needs_compiler
def test_a_failing_build_warns_with_the_compiler_message(fresh, monkeypatch, tmp_path_factory):
    broken = tmp_path_factory.mktemp("src") / "roi_max.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.warns(UserWarning, match="failed"):
        assert native.roi_max_kernel(torch.float32) is None


def _special(gen, shape, dtype):
    x = torch.randn(shape, generator=gen, dtype=dtype)
    u = torch.rand(shape, generator=gen)
    x[u < 0.03] = float("nan")
    x[(u >= 0.03) & (u < 0.1)] = float("-inf")
    x[(u >= 0.1) & (u < 0.13)] = float("inf")
    x[(u >= 0.13) & (u < 0.2)] = 0.5  # ties
    x[:, -1] = float("-inf")  # a whole plane of -inf
    return x


@needs_compiler
@pytest.mark.parametrize(
    "levels",
    [(1, 2, 4, 7), (14, 7, (3, 2), (6, 4), 2, 2)],
    ids=["derived and direct", "non-nesting, pairs, repeated"],
)
@pytest.mark.parametrize("channels", [1, 3, 4, 6, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_the_torchvision_path(gen, monkeypatch, levels, channels, dtype):
    """Same values (NaN where NaN) and the same argmax as the other path, on every channel count
    around the kernel's 4-channel blocks, with and without argmax, several levels in one call:
    coarse levels derived in the kernel, 7 of 14 where the float partition does not nest for some
    RoIs (pooled directly there), rectangular levels and a level asked twice."""
    x = _special(gen, (2, channels, 13, 10), dtype)
    xy = torch.rand(40, 4, generator=gen, dtype=dtype) * 30 - 8
    rois = torch.cat(
        [torch.randint(0, 2, (40, 1), generator=gen).to(dtype), xy[:, :2], xy[:, :2] + xy[:, 2:]], 1
    )
    levels = bins.normalize_levels(levels)
    for with_argmax in (True, False):
        args = ([x], rois, None, [0.7], levels, "max", "roi", with_argmax)
        compiled = cpu.pyramid_pool_forward(*args)
        monkeypatch.setattr(native, "roi_max_kernel", lambda dtype: None)
        other = cpu.pyramid_pool_forward(*args)
        monkeypatch.undo()
        assert torch.equal(compiled[0].isnan(), other[0].isnan())
        assert torch.equal(compiled[0].nan_to_num(), other[0].nan_to_num())
        assert torch.equal(compiled[1], other[1])


@needs_compiler
def test_edges_past_the_map_are_clamped_and_bad_batch_indices_refused(gen):
    """The kernel never reads outside the map, whatever edges the host side hands it."""
    kernel = native.roi_max_kernel(torch.float32)
    x = torch.randn(2, 3, 5, 6, generator=gen)
    k = 2
    # rows [-100, 3) then [3, 100), columns [-7, 60): clamped to the map
    geometry = {
        (2, 1): (
            torch.tensor([[-100, 3]] * k),
            torch.tensor([[3, 100]] * k),
            torch.tensor([[-7]] * k),
            torch.tensor([[60]] * k),
        )
    }
    out, arg = cpu._roi_max_native(kernel, x, torch.tensor([0, 1]), [(2, 1)], geometry, True)
    want = torch.stack([x[:, :, :3].amax((2, 3)), x[:, :, 3:].amax((2, 3))], 2).flatten(1)
    assert torch.equal(out, want)
    assert int(arg.min()) >= 0 and int(arg.max()) < 5 * 6
    with pytest.raises(ValueError, match="batch index"):
        cpu._roi_max_native(kernel, x, torch.tensor([0, 2]), [(2, 1)], geometry, False)
    # a plane past int32 positions: refused by the host side before the map is touched, and by
    # the kernel itself before anything is read (dimensions only: no RoI, no data)
    huge = x.new_zeros(1).as_strided((1, 1, 2**16, 2**15), (0, 0, 0, 0))
    empty = {(1, 1): tuple(torch.zeros(0, 1, dtype=torch.int64) for _ in range(4))}
    with pytest.raises(ValueError, match="int32"):
        cpu._roi_max_native(kernel, huge, torch.zeros(0, dtype=torch.int64), [(1, 1)], empty, False)
    assert kernel(None, 1, 1, 2**16, 2**15, None, 0, None, 0, None, None, 0, None) == 2


@needs_compiler
@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["max at the end", "max at the start"])
@pytest.mark.parametrize("with_argmax", [True, False])
def test_levels_that_do_not_nest_for_some_rois_are_pooled_directly(
    monkeypatch, direction, with_argmax
):
    """Ratio-7 levels (1 from 7, 2 from 14) do not nest under the float partition at some extents;
    on a ramp every bin's maximum sits on an edge of the bin, so a union of fine bins that missed
    or overstepped one row or column of the coarse bin would change its value."""
    size = 130
    ramp = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size) * direction
    x = torch.cat([ramp, ramp.transpose(2, 3)], 1)
    rois = torch.tensor([[0, 0.0, 0.0, float(e), float(e)] for e in range(1, 125)])
    levels = bins.normalize_levels((1, 2, 7, 14))
    q = cpu._quantise(rois, 1.0, torch.float32, torch.float32)
    geometry = cpu._geometry(q, levels, size, size, torch.float32)
    assert cpu._nesting_fails(geometry, (14, 14), (2, 2)).numel() >= 2  # the case does occur
    args = ([x], rois, None, [1.0], levels, "max", "roi", with_argmax)
    compiled = cpu.pyramid_pool_forward(*args)
    monkeypatch.setattr(native, "roi_max_kernel", lambda dtype: None)
    other = cpu.pyramid_pool_forward(*args)
    assert torch.equal(compiled[0], other[0])
    assert torch.equal(compiled[1], other[1])


@needs_compiler
@pytest.mark.parametrize("partition", ["roi", "adaptive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_equals_the_torchvision_path(gen, monkeypatch, partition, dtype):
    """The compiled backward against torchvision's ``_roi_pool_backward`` per level: two maps
    (rows scattered between them, one map read by no RoI), several levels, empty bins (RoIs past
    the map), both partitions. Integer gradients make every sum exact in any order, so the
    comparison is bitwise although levels are added in another order."""
    maps = [_special(gen, (2, 5, 13, 10), dtype).nan_to_num(0.0, 1.0, -1.0) for _ in range(3)]
    k = 30
    xy = torch.rand(k, 4, generator=gen, dtype=dtype) * 30 - 8
    rois = torch.cat(
        [torch.randint(0, 2, (k, 1), generator=gen).to(dtype), xy[:, :2], xy[:, :2] + xy[:, 2:]], 1
    )
    if partition == "adaptive":  # regions: (batch index, valid height, valid width)
        rois = torch.tensor([[0, 13, 10], [1, 5, 7], [1, 1, 1]]).repeat(k // 3, 1)
    feature_index = torch.randint(0, 2, (k,), generator=gen)  # map 2: no RoI
    levels = bins.normalize_levels((1, 2, 3, 6))
    args = (maps, rois, feature_index, [0.7] * 3, levels, "max", partition)
    _, argmax = cpu.pyramid_pool_forward(*args, with_argmax=True)
    grad_out = torch.randint(-8, 9, argmax.shape, generator=gen).to(dtype)
    compiled = cpu.pyramid_pool_backward(grad_out, *args, argmax)
    monkeypatch.setattr(native, "roi_max_backward_kernel", lambda dtype: None)
    other = cpu.pyramid_pool_backward(grad_out, *args, argmax)
    assert len(compiled) == 3 and not compiled[2].any()
    for a, b in zip(compiled, other, strict=True):
        assert a.dtype == b.dtype == dtype and a.is_contiguous()
        assert torch.equal(a, b)
    assert compiled[0].any() and compiled[1].any()
