"""spp_triton.bench.sass: SASS parsing and loop detection on a synthetic snippet, occupancy, the
torchvision roi_pool hot loops, and a small slice of the report compiled for sm_90 (no GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spp_triton.bench import sass

REPO = Path(__file__).resolve().parents[1]

# cuobjdump -sass layout: an outer loop 0x0040..0x00f0 holding an inner loop 0x0060..0x00b0, a
# forward branch, and the trap (unconditional branch to itself) after EXIT.
SNIPPET = """
        code for sm_90
                Function : toy_kernel
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x00000a00ff017b82 */
                                                                         /* 0x000fe20000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                    /* 0x0000000000007919 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;   /* 0x000000100000780c */
        /*0030*/               @P0 BRA 0x100 ;                           /* 0x0000000000300947 */
        /*0040*/                   MOV R2, RZ ;                          /* 0x000000ff00027202 */
        /*0050*/                   IADD3 R3, R0, 0x1, RZ ;               /* 0x0000000100037810 */
        /*0060*/                   LDG.E.128 R4, desc[UR6][R8.64] ;      /* 0x0000000608047981 */
        /*0070*/                   LDG.E.U16 R12, desc[UR6][R10.64] ;    /* 0x000000060a0c7981 */
        /*0080*/                   FMNMX R2, R2, R4, !PT ;               /* 0x0000000402027209 */
        /*0090*/                   SHFL.BFLY PT, R13, R2, 0x1, 0x1f ;    /* 0x0c201f00020d7f89 */
        /*00a0*/                   ISETP.NE.AND P1, PT, R3, RZ, PT ;     /* 0x000000ff0300720c */
        /*00b0*/               @P1 BRA 0x60 ;                            /* 0xfffffffc00681947 */
        /*00c0*/                   MEMBAR.ALL.GPU ;                      /* 0x0000000000007992 */
        /*00d0*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R8.64], R2 ;
        /*00e0*/                   ISETP.NE.AND P2, PT, R0, RZ, PT ;     /* 0x000000ff0000720c */
        /*00f0*/           @!P2 BRA !P0, 0x40 ;                          /* 0xfffffff400d0a947 */
        /*0100*/                   EXIT ;                                /* 0x000000000000794d */
        /*0110*/                   BRA 0x110;                            /* 0xfffffffc00fc7947 */
"""


def test_parse_and_loops_on_synthetic_sass():
    funcs = sass.parse_sass(SNIPPET)
    assert list(funcs) == ["toy_kernel"]
    instrs = funcs["toy_kernel"]
    assert len(instrs) == 18
    assert instrs[3].pred == "@P0" and instrs[3].opcode == "BRA" and instrs[3].operands == "0x100"
    assert instrs[6].base == "LDG" and instrs[6].opcode == "LDG.E.128"

    loops = sass.find_loops(instrs)
    assert [(loop.start, loop.end) for loop in loops] == [(0x40, 0xF0), (0x60, 0xB0)]
    (inner,) = sass.innermost_loops(loops)
    assert [i.addr for i in inner.body] == list(range(0x60, 0xC0, 0x10))

    assert [sass.load_bits(i) for i in inner.body if i.base == "LDG"] == [128, 16]
    mix = sass.instruction_mix(inner.body)
    assert mix == {"total": 6, "LDG.128": 1, "LDG.U16": 1, "SHFL": 1}


def test_hot_loop_figures_on_synthetic_sass():
    instrs = sass.parse_sass(SNIPPET)["toy_kernel"]
    fwd = sass.analyse_function(instrs, elem_bytes=2, backward=False)
    # bf16: LDG.128 = 8 elements, LDG.U16 = 1 -> 6 instructions / 9 elements.
    assert fwd["n_hot_loops"] == 1
    (hot,) = fwd["hot_loops"]
    assert hot["instructions"] == 6 and hot["loaded_elements"] == 9
    assert fwd["per_element_median"] == pytest.approx(6 / 9, abs=1e-3)
    # Counted over every loop (the outer one holds the MEMBAR), not only hot ones.
    assert fwd["membar_in_loops"] == 1 and fwd["shfl_in_loops"] == 1 and fwd["bar_in_loops"] == 0
    bwd = sass.analyse_function(instrs, elem_bytes=4, backward=True)
    assert bwd["n_hot_loops"] == 1  # the outer loop holds the atomic but is not innermost
    assert bwd["kernel_figures"]["atomic_elements"] == 1


def test_static_occupancy():
    # 32 registers: 1024 per warp, 64 warps fit; 142 -> 4608 per warp, 14 warps, 3 blocks of 4.
    assert sass.static_occupancy(32, 16, 0, 90) == dict(warps=64, occupancy=1.0, limiter="warps")
    occ = sass.static_occupancy(142, 4, 2048, 90)
    assert occ == dict(warps=12, occupancy=0.188, limiter="registers")
    # Shared memory: 100 KB blocks -> 2 per SM on sm_90, 1 on sm_80.
    assert sass.static_occupancy(32, 4, 100 * 1024, 90)["warps"] == 8
    assert sass.static_occupancy(32, 4, 100 * 1024, 80)["limiter"] == "shared"


def test_variant_matrix_and_selection():
    names = [v.name for v in sass.VARIANTS]
    assert len(names) == len(set(names)) == 2 * 2 * 3 * 2 * 2 * 2 + 3 * 2 * 2 * 2
    assert "fwd-max-noarg-7x7-fpn4-bf16-nhwc" in names
    chosen = sass.select_variants(["bwd-*-1-2-3-6-*"], main_only=True)
    assert [v.name for v in chosen] == [
        "bwd-max-1-2-3-6-1map-fp32-nchw",
        "bwd-max-1-2-3-6-fpn4-fp32-nchw",
        "bwd-avg-1-2-3-6-1map-fp32-nchw",
        "bwd-avg-1-2-3-6-fpn4-fp32-nchw",
    ]


def _has_tools() -> bool:
    """Triton's cuobjdump, and a torchvision built with sm_90 code (the CUDA wheels are)."""
    try:
        usage = sass.resource_usage(sass.torchvision_binary(), 90)
    except (RuntimeError, OSError, subprocess.CalledProcessError):
        return False
    return any(sass.TORCHVISION_KERNELS["fwd"].search(name) for name in usage)


needs_tools = pytest.mark.skipif(
    not _has_tools(), reason="needs Triton's cuobjdump and a torchvision with sm_90 kernels"
)


@needs_tools
def test_torchvision_roi_pool_hot_loops():
    rows = {r["direction"]: r for r in sass.analyse_torchvision(90)}
    fwd, bwd = rows["fwd"], rows["bwd"]
    assert fwd["n_hot_loops"] >= 1 and 2 < fwd["per_element_median"] < 8
    loop = fwd["median_loop"]
    assert loop["mix"].get("LDG.32", 0) >= 4  # the unrolled serial loop over a bin
    assert fwd["shfl_in_loops"] == 0 and fwd["bar_in_loops"] == 0
    assert bwd["n_hot_loops"] >= 1 and bwd["median_loop"]["atomic_elements"] >= 1
    assert 0 < fwd["regs"] <= 255 and fwd["warps"] > 0


@needs_tools
def test_report_slice_compiles_for_sm90(tmp_path):
    cases = ["fwd-max-1-2-4-1map-fp32-nchw", "bwd-avg-1-2-4-1map-bf16-nhwc"]
    report = sass.run_report(archs=(90,), patterns=cases, jobs=2, sass_dir=tmp_path / "sass")
    rows = {r["name"]: r for r in report["variants"]}
    assert sorted(rows) == sorted(cases)
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert isinstance(row["regs"], int) and 0 < row["regs"] <= 255
        assert isinstance(row["spills"], int) and row["spills"] >= 0
        assert 0 < row["warps"] <= 64 and row["kernel_figures"]["instructions"] > 0
        assert (tmp_path / "sass" / f"{row['name']}.sm90.sass").exists()
    fwd = rows["fwd-max-1-2-4-1map-fp32-nchw"]
    assert fwd["n_hot_loops"] >= 1 and fwd["per_element_median"] > 0
    assert fwd["median_loop"]["loaded_elements"] > 0
    (spec_nchw, spec_nhwc) = report["specializations"]
    assert 1 <= spec_nchw["distinct"] <= len(sass.SPEC_SIZES)
    assert spec_nhwc["layout"] == "nhwc"
    assert {t["direction"] for t in report["torchvision"]} == {"fwd", "bwd"}

    js, md = sass.write_report(report, tmp_path / "out")
    data = json.loads(js.read_text())
    assert len(data["variants"]) == 2
    text = md.read_text()
    assert "## sm_90: 2 variants" in text and "torchvision roi_pool fwd" in text
    assert "fwd-max-1-2-4-1map-fp32-nchw" in text and "distinct compiled variants" in text


def test_cli_lists_variants(capsys):
    spec = importlib.util.spec_from_file_location("sass_report", REPO / "tools" / "sass_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--list", "--cases", "fwd-avg-7x7-*-nhwc"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    assert capsys.readouterr().out.split() == [
        "fwd-avg-7x7-1map-fp32-nhwc",
        "fwd-avg-7x7-1map-bf16-nhwc",
        "fwd-avg-7x7-fpn4-fp32-nhwc",
        "fwd-avg-7x7-fpn4-bf16-nhwc",
    ]


# Three innermost loops: two copies of a x4-unrolled body (4 loads, 6 instructions) and one
# remainder loop (1 load, 3 instructions); the main loop is the unrolled one, the remainder is
# listed apart.
_UNROLLED = """
        /*{a0:04x}*/                   LDG.E R4, desc[UR6][R8.64] ;
        /*{a1:04x}*/                   LDG.E R5, desc[UR6][R8.64+0x4] ;
        /*{a2:04x}*/                   LDG.E R6, desc[UR6][R8.64+0x8] ;
        /*{a3:04x}*/                   LDG.E R7, desc[UR6][R8.64+0xc] ;
        /*{a4:04x}*/                   FMNMX.NAN R2, R2, R4, !PT ;
        /*{a5:04x}*/               @P1 BRA 0x{a0:x} ;
"""
_REMAINDER = """
        /*{a0:04x}*/                   LDG.E R4, desc[UR6][R8.64] ;
        /*{a1:04x}*/                   FMNMX.NAN R2, R2, R4, !PT ;
        /*{a2:04x}*/               @P1 BRA 0x{a0:x} ;
"""


def _block(template: str, start: int) -> str:
    return template.format(**{f"a{i}": start + 0x10 * i for i in range(6)})


def test_main_loop_is_the_unrolled_one():
    text = "        code for sm_90\n                Function : k\n"
    text += _block(_UNROLLED, 0x0) + _block(_REMAINDER, 0x60) + _block(_UNROLLED, 0x90)
    fwd = sass.analyse_function(sass.parse_sass(text)["k"], elem_bytes=4, backward=False)
    assert fwd["n_hot_loops"] == 3
    assert fwd["per_element_main"] == pytest.approx(6 / 4)
    assert fwd["main_loop"]["loaded_elements"] == 4
    shapes = {(s["instructions"], s["elements"]): s["count"] for s in fwd["loop_shapes"]}
    assert shapes == {(6, 4): 2, (3, 1): 1}
    assert fwd["per_element_max"] == pytest.approx(3.0)
