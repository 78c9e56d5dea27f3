"""What the Triton and CUDA static checks share: ptxas -v log parsing, PTX instruction counts, kernel names,
the architectures' limits and the table printer. Standard library only."""

import re
from collections import Counter
from dataclasses import dataclass

# The GEMM-shaped ops (dpm_ops/triton/<op>.py, csrc/<op>/): their GEMMs must run on tensor cores (Triton:
# in TF32 mode and on bf16 inputs) or in cuBLAS (CUDA: no SIMT GEMM loop left in the op's kernels).
GEMM_OPS = ("masked_cosine", "knn", "masked_arcface", "knn_certified")
# Max dynamic shared memory per block with cudaFuncSetAttribute opt-in (CUDA programming guide,
# compute capabilities table): 227 KB on sm_90, 163 KB on sm_80.
SMEM_OPTIN_LIMIT = {90: 232448, 80: 166912}
# Max grid dimensions (x, y, z) of sm_80 and sm_90.
GRID_LIMITS = (2**31 - 1, 65535, 65535)

# Tensor-core instructions: wgmma (sm_90 warpgroup), mma.sync (sm_80+) and wmma.
_TENSOR_CORE = re.compile(r"\b(wgmma|wmma|mma)\.")
# Approximate square roots and divisions (Triton's fp32 tl.sqrt / tl.rsqrt and `/`): not correctly
# rounded (sqrt.approx not even monotone), where torch and the CUDA kernels round both correctly.
_APPROXIMATE = re.compile(r"\b(r?sqrt\.approx|div\.full|div\.approx)\.")
# Floating-point multiply-adds of SIMT code: destination, operands (integer mad.lo/.wide is index arithmetic).
_SIMT_FMA = re.compile(r"\b(?:fma|mad)\.rn(?:\.ftz)?(?:\.sat)?\.f(?:32|64)\s+(%\w+),\s*([^;]+);")
_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)*\.entry\s+([\w$]+)", re.M)


@dataclass
class Usage:
    """One kernel's resources as ptxas -v reports them (smem: static shared memory only)."""

    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


def parse_ptxas_log(log: str) -> dict:
    """{entry function (mangled) name: Usage} from `ptxas -v` output (also ptxas-blackwell's)."""
    usage, current = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = usage.setdefault(m.group(1), Usage())
        elif m := re.search(r"Function properties for (\S+)", line):
            current = usage.get(m.group(1))  # None for a non-entry .func: its lines are skipped
        elif current is not None and (
            m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                r"(\d+) bytes spill loads",
                line,
            )
        ):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current.regs = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.smem = int(smem.group(1)) if smem else 0
    return usage


def ptx_entries(ptx: str) -> dict:
    """{entry name: its PTX text} (each entry runs to the next one; nvcc and Triton inline device functions)."""
    starts = list(_ENTRY.finditer(ptx))
    return {
        m.group(1): ptx[m.start() : (starts[i + 1].start() if i + 1 < len(starts) else len(ptx))]
        for i, m in enumerate(starts)
    }


# Triton's SASS (triton.tools.disasm: cuobjdump -sass with branch targets as labels "LBB<n>:").
_SASS_LABEL = re.compile(r"^(LBB\d+):\s*$")
_SASS_BRANCH = re.compile(r"\bBRA\s+(LBB\d+)\s*;")
_SASS_LOCAL_MEMORY = re.compile(r"\b(?:STL|LDL)(?:\.\w+)*\s")


def hot_spill_instructions(sass: str) -> int:
    """The local-memory loads and stores (what ptxas spills to) inside an innermost loop of Triton's
    SASS: a loop runs from a label to a later branch back to it, and an innermost one holds no other
    loop. Spills there run every iteration of a GEMM's or a merge's inner loop; spills elsewhere run
    once per iteration of an outer loop (loop invariants reloaded per tile)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _SASS_LABEL.match(line))}
    loops = [
        (labels[m.group(1)], i)
        for i, line in enumerate(lines)
        if (m := _SASS_BRANCH.search(line)) and labels.get(m.group(1), i) < i
    ]
    innermost = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
    return sum(
        1
        for i, line in enumerate(lines)
        if _SASS_LOCAL_MEMORY.search(line) and any(start < i < end for start, end in innermost)
    )


def tensor_core_instructions(ptx: str) -> str:
    """The kinds of tensor-core instruction in the PTX ("wgmma", "mma", "wgmma+mma"; "" for none)."""
    return "+".join(sorted(set(_TENSOR_CORE.findall(ptx)), key=("wgmma", "mma", "wmma").index))


def uses_tensor_cores(ptx: str) -> bool:
    return bool(_TENSOR_CORE.search(ptx))


def approximate_instructions(ptx: str) -> str:
    """The approximate square roots and divisions the PTX holds, as 'div.full x3, sqrt.approx x1';
    '' for none."""
    counts = Counter(_APPROXIMATE.findall(ptx))
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))


def fma_counts(ptx: str) -> tuple:
    """(fp32/fp64 FMAs, unchained ones: those not taking the previous FMA's result). Polynomial
    expansions (exp, log, division) are chains of FMAs each feeding the next; a GEMM tile's FMAs
    update independent accumulators, so they stay unchained."""
    total = unchained = 0
    previous = None
    for m in _SIMT_FMA.finditer(ptx):
        total += 1
        unchained += previous not in (op.strip() for op in m.group(2).split(","))
        previous = m.group(1)
    return total, unchained


def short_name(demangled: str) -> str:
    """'void dpm_ops::knn::cuda::(anonymous namespace)::knn_kernel<float, true>(float const*, ...)'
    -> 'knn_kernel<float, true>': return type, namespaces and parameter list dropped."""
    depth, cut = 0, len(demangled)
    for i, ch in enumerate(demangled):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and not demangled.startswith("(anonymous namespace)", i):
            cut = i  # the parameter list
            break
    return re.sub(r"(?:\w+::|\(anonymous namespace\)::)+", "", demangled[:cut]).removeprefix("void ")


def print_table(rows: list, headers: list) -> None:
    widths = [max(len(str(v)) for v in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
