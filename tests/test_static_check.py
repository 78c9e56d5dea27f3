"""The static GPU checks' own tests (scripts/static_check/): the ptxas / PTX parsers on known text, and the
Triton check end to end on one small case (compiled ahead of time for sm_90: no GPU needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "scripts" / "static_check"
sys.path.insert(0, str(TOOLS))
import ptx_tools  # noqa: E402

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIfEvPT_
    24 bytes stack frame, 68 bytes spill stores, 76 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 24 bytes cumulative stack size, 14464 bytes smem
ptxas info    : Function properties for _Z6helperv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas-blackwell info    : Compiling entry function 'tile' for 'sm_90a'
ptxas-blackwell info    : Function properties for tile
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 96 registers, used 1 barriers
"""

# Two entries: a 2x2 register tile (four independent accumulators) and a Horner chain.
PTX = """\
.visible .entry tile(
{
	fma.rn.f32 	%f5, %f1, %f3, %f5;
	fma.rn.f32 	%f6, %f1, %f4, %f6;
	fma.rn.f32 	%f7, %f2, %f3, %f7;
	fma.rn.f32 	%f8, %f2, %f4, %f8;
	mad.lo.s32 	%r1, %r2, %r3, %r4;
}
.visible .entry chain(
{
	fma.rn.f64 	%fd2, %fd1, %fd9, %fd8;
	fma.rn.f64 	%fd3, %fd2, %fd9, %fd7;
	fma.rn.f64 	%fd4, %fd3, %fd9, %fd6;
	mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1};
}
"""


# Triton's SASS of a tile loop (LBB0) around a k-loop (LBB1) and a merge loop (LBB2): a loop invariant
# spilled before the tile loop and reloaded once per tile, and one spill store inside the merge loop.
SASS = """\
Function:kernel
--:-:1:-:1	STL [R1+0x4], R3;
LBB0:
--:-:2:-:1	LDL R13, [R1+0x4];
LBB1:
--:-:-:-:1	HMMA.16816.F32.BF16 R4, R8, R10, R4;
--:-:-:-:5	@!P4 BRA LBB1;
LBB2:
--:-:-:-:1	FMNMX R5, R5, R6, PT;
--:-:1:-:1	STL.64 [R1+0x8], R6;
--:-:-:-:5	@P5 BRA LBB2;
--:-:-:-:5	@!P3 BRA LBB0;
LBB3:
--:-:-:Y:0	BRA LBB3;
"""


def test_hot_spill_instructions():
    assert ptx_tools.hot_spill_instructions(SASS) == 1  # the merge loop's store; not the tile loop's reload
    cold = SASS.replace("--:-:1:-:1\tSTL.64 [R1+0x8], R6;\n", "")
    assert ptx_tools.hot_spill_instructions(cold) == 0
    assert ptx_tools.hot_spill_instructions(cold.replace("LBB1:\n", "LBB1:\n--:-:2:-:1\tLDL R7, [R1];\n")) == 1


def test_parse_ptxas_log():
    usage = ptx_tools.parse_ptxas_log(PTXAS_LOG)
    assert set(usage) == {"_Z6kernelIfEvPT_", "tile"}  # the non-entry _Z6helperv is not a kernel
    assert usage["_Z6kernelIfEvPT_"] == ptx_tools.Usage(regs=64, spill_stores=68, spill_loads=76, stack=24, smem=14464)
    assert usage["tile"] == ptx_tools.Usage(regs=96) and not usage["tile"].spills


def test_ptx_entries_fma_counts_and_tensor_cores():
    entries = ptx_tools.ptx_entries(PTX)
    assert list(entries) == ["tile", "chain"]
    assert ptx_tools.fma_counts(entries["tile"]) == (4, 4)  # integer mad is index arithmetic
    assert ptx_tools.fma_counts(entries["chain"]) == (3, 1)
    assert not ptx_tools.uses_tensor_cores(entries["tile"]) and ptx_tools.uses_tensor_cores(entries["chain"])
    assert ptx_tools.tensor_core_instructions(entries["chain"]) == "mma"
    assert (
        ptx_tools.tensor_core_instructions("wgmma.mma_async.sync.aligned.m64n64k16 ...; mma.sync.aligned ...")
        == "wgmma+mma"
    )
    assert ptx_tools.tensor_core_instructions(entries["tile"]) == ""


def test_approximate_instructions():
    ptx = (
        "sqrt.approx.ftz.f32 %f2, %f1;\n\tsqrt.rn.f32 %f3, %f1;\n\trsqrt.approx.f32 %f4, %f1;\n\tsqrt.rn.f64 %fd2, %fd1;"
        "\n\tdiv.full.f32 %r3, %r1, %r2;\n\tdiv.rn.f32 %r4, %r1, %r2;\n\tdiv.rn.f64 %rd5, %rd1, %rd3;"
        "\n\tdiv.approx.ftz.f32 %r5, %r1, %r2;\n\tdiv.full.f32 %r6, %r1, %r2;"
    )
    assert ptx_tools.approximate_instructions(ptx) == "div.approx x1, div.full x2, rsqrt.approx x1, sqrt.approx x1"
    assert ptx_tools.approximate_instructions(PTX) == ""


def test_short_name():
    demangled = (
        "void dpm_ops::masked_cosine::cuda::(anonymous namespace)::rows_normalize_backward_kernel<float, "
        "float, dpm_ops::masked_cosine::cuda::(anonymous namespace)::ProtoRowGrad<float> >(float const*, "
        "float const*, long, float, dpm_ops::masked_cosine::cuda::(anonymous namespace)::ProtoRowGrad<float>, "
        "float*)"
    )
    assert ptx_tools.short_name(demangled) == "rows_normalize_backward_kernel<float, float, ProtoRowGrad<float> >"
    assert (
        ptx_tools.short_name("dpm_ops::rank::cuda::(anonymous namespace)::count_kernel(long const*)") == "count_kernel"
    )


def test_triton_check_one_case(tmp_path):
    """The real tool on the HEM loss (fp32 forward + backward): two variants, compiled, clean."""
    pytest.importorskip("triton")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "triton_check.py"),
            "--arch",
            "90",
            "--only",
            "hem_loss fwd+bwd B64 H12 N210 fp32",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["failures"] == []
    assert sorted(v["constexprs"].split()[0] for v in data["variants"]) == ["GRAD=False", "GRAD=True"]
    assert all(v["kernel"] == "_hem_sample_kernel" and v["regs"] > 0 for v in data["variants"])
