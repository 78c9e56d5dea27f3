#!/usr/bin/env python3
"""Compile every CUDA kernel (csrc/**/*.cu, torch-free) for sm_90 with nvcc -Xptxas -v, without a GPU.

Prints registers, spills, stack and static shared memory of every kernel instantiation (demangled:
prepare_rows_kernel<__nv_bfloat16, __nv_bfloat16, float>), and fails on: an nvcc error, spills in a non-double
instantiation, static shared memory over the opt-in limit, and, in the GEMM-shaped ops (GEMM_OPS),
a kernel that still runs a SIMT GEMM loop: many fp32/fp64 FMAs in its PTX and no tensor-core
instruction, and an approximate division or square root (fast-math intrinsics: torch rounds both
correctly). The sources and flags are the build's (dpm_ops/_sources.py, torch's nvcc defines);
host code is compiled too, so this also is the CUDA compile check. Nothing is written into the repository.

    python scripts/static_check/cuda_check.py [--arch 90] [--jobs 2] [--json OUT]
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.dont_write_bytecode = True

from ptx_tools import (  # noqa: E402  (after the bytecode switch)
    GEMM_OPS,
    approximate_instructions,
    SMEM_OPTIN_LIMIT,
    fma_counts,
    parse_ptxas_log,
    print_table,  # noqa: E402
    ptx_entries,
    short_name,
    uses_tensor_cores,
)

REPO = Path(__file__).resolve().parents[2]

# A kernel of a GEMM-shaped op with at least this many unchained fp32/fp64 FMAs in its PTX
# (ptx_tools.fma_counts) and no tensor-core instruction still runs a SIMT GEMM tile. An unrolled
# register tile issues TM x TN independent FMAs per depth step times the unrolled depth: 512 in the
# SIMT masked-cosine forward this check was written against (4 x 4 outputs x 2 dots x 16 steps), 128
# in the old knn distance tile (both replaced by cuBLAS GEMMs since).
# Epilogue, normalisation and selection kernels have few: 1 in the row kernels, 40 to 70 in the
# log-sum-exp rows of masked ArcFace and MaskReID's ranking rows (their exp/log/division
# expansions are FMA chains, 250 FMAs in all in fp64, which the raw count would flag).
SIMT_GEMM_MIN_FMAS = 96


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_OPTIN_LIMIT))
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="parallel nvcc processes (CI has 2 cores)")
    ap.add_argument("--json", default=None, help="write the kernels and failures here")
    ap.add_argument("--repo", default=str(REPO), help="the dpm_ops checkout to check")
    return ap.parse_args(argv)


def build_config(repo: Path):
    """(the .cu sources, nvcc flags) of the project's build: dpm_ops/_sources.py's list and flags, torch's
    extension defines (e.g. __CUDA_NO_HALF_OPERATORS__, which change the code), minus its -gencode flags."""
    spec = importlib.util.spec_from_file_location("dpm_sources", repo / "dpm_ops" / "_sources.py")
    sources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sources)
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    flags = [f for f in sources.compile_flags(with_cuda=True)["nvcc"] if not f.startswith("-gencode")]
    return [Path(p) for p in sources.sources(repo, with_cuda=True) if p.endswith(".cu")], COMMON_NVCC_FLAGS + flags


def compile_one(nvcc: str, source: Path, flags: list, arch: int, tmp: str):
    """nvcc -c with ptxas -v, keeping the PTX: (returncode, ptxas/nvcc log, PTX text)."""
    keep = tempfile.mkdtemp(dir=tmp)
    cmd = [
        nvcc,
        *flags,
        "-std=c++17",
        f"-arch=sm_{arch}",
        "-Xptxas",
        "-v",
        "-c",
        str(source),
        "-o",
        os.path.join(keep, "out.o"),
        "--keep",
        "--keep-dir",
        keep,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    ptx = Path(keep, source.stem + ".ptx")
    return result.returncode, result.stdout + result.stderr, ptx.read_text() if ptx.exists() else ""


def demangle(names: list) -> dict:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    nvcc = os.environ.get("NVCC") or "nvcc"
    repo = Path(args.repo)
    sources, flags = build_config(repo)
    failures, kernels = [], []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda s: compile_one(nvcc, s, flags, args.arch, tmp), sources))
    usages = {}
    for source, (code, log, ptx) in zip(sources, results):
        rel = source.relative_to(repo)
        if code != 0:
            errors = [line for line in log.splitlines() if "error" in line] or log.splitlines()[-1:]
            failures.append(f"{rel}: nvcc failed: {errors[0].strip()[:300]}")
            continue
        entries = ptx_entries(ptx)
        for name, usage in parse_ptxas_log(log).items():
            body = entries.get(name, "")
            usages[name] = (rel, usage, *fma_counts(body), uses_tensor_cores(body), approximate_instructions(body))
    names = demangle(sorted(usages))
    limit = SMEM_OPTIN_LIMIT[args.arch]
    for mangled, (rel, usage, fmas, unchained, tensor_cores, approximations) in sorted(
        usages.items(), key=lambda kv: (str(kv[1][0]), names[kv[0]])
    ):
        name = short_name(names[mangled])
        where = f"{name} ({rel})"
        if usage.spills and "double" not in name.partition("<")[2]:
            failures.append(
                f"{where}: spills {usage.spill_stores} B stores / {usage.spill_loads} B loads ({usage.regs} registers)"
            )
        if usage.smem > limit:
            failures.append(f"{where}: {usage.smem} B static shared memory > the opt-in limit {limit} B")
        if rel.parts[1] in GEMM_OPS and unchained >= SIMT_GEMM_MIN_FMAS and not tensor_cores:
            failures.append(
                f"{where}: a SIMT GEMM loop ({unchained} unchained FMAs >= {SIMT_GEMM_MIN_FMAS}, "
                "no tensor-core instruction): move the GEMM to cuBLAS or tensor cores"
            )
        if approximations:
            failures.append(f"{where}: {approximations}: divide and take roots correctly rounded, as torch does")
        kernels.append(
            dict(
                file=str(rel),
                kernel=name,
                mangled=mangled,
                regs=usage.regs,
                spill_stores=usage.spill_stores,
                spill_loads=usage.spill_loads,
                stack=usage.stack,
                smem=usage.smem,
                fmas=fmas,
                unchained_fmas=unchained,
                tensor_cores=tensor_cores,
            )
        )
    print(
        f"== nvcc sm_{args.arch}: {len(sources)} files, {len(kernels)} kernel instantiations (flags: {' '.join(flags)})"
    )
    print_table(
        [
            [
                k["file"].split("/")[1],
                k["kernel"],
                k["regs"],
                f"{k['spill_stores']}/{k['spill_loads']}",
                k["stack"],
                k["smem"],
                f"{k['fmas']}/{k['unchained_fmas']}",
                "yes" if k["tensor_cores"] else "no",
            ]
            for k in kernels
        ],
        ["op", "kernel", "regs", "spill st/ld", "stack", "smem", "FMAs/unchained", "tensor cores"],
    )
    for failure in failures:
        print(f"FAIL: sm_{args.arch} {failure}")
    print(f"== nvcc sm_{args.arch}: {len(kernels)} kernels, {len(failures)} failures, {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "kernels": kernels, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
