#!/usr/bin/env python3
"""Ahead-of-time compile every Triton kernel of dpm_ops/triton/ for sm_90 and sm_80, without a GPU.

The project's own launchers run at the shapes the library runs, on meta tensors (shapes and dtypes,
no memory, so the MSMT17 shapes cost nothing; the launchers' torch code must not read values, which
would sync a GPU anyway). Triton's driver is replaced by one that only names a target, and
JITFunction.run always takes its warmup path: Triton's real binder specialises the launch exactly as
on a GPU (dtypes, i32/i64, divisibility by 16, constexprs) and compiles it; the launch is skipped.
Triton's in-memory kernel cache dedupes identical specialisations, so each distinct (kernel,
signature, constexprs, target) is compiled once; ptxas -v (which Triton runs anyway) gives
registers and spills. One process per architecture, in parallel.

Fails on: a compile error, a launcher exception, a grid over the hardware limits, shared memory
over the architecture's opt-in limit, register spills (printed, not failed: fp64-only variants', and
at most COLD_SPILL_BYTES none of which sits in an innermost loop of the SASS),
a GEMM-shaped kernel without tensor-core instructions on sm_90 in TF32 or bf16 mode
(GEMM_OPS), an fp64 variant with an fp32 scalar argument (Triton passes a plain Python float as fp32:
the kernel would compute fp64 input with fp32-rounded constants), an approximate square root or division
(fp32 tl.sqrt and / are sqrt.approx and div.full on a GPU, exact under the interpreter: _precision.sqrt_rn,
div_rn), a launch that leaves FMA
contraction to Triton's default (which 3.10 turns off: _precision.COMPILE_OPTIONS), and a kernel that no case launches. Nothing is written into the repository
(no bytecode; Triton's cache lives in a temporary folder, removed at exit).

    python scripts/static_check/triton_check.py [--arch 90,80] [--only SUBSTRING] [--json OUT]
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # the child processes too

from ptx_tools import (  # noqa: E402  (after the bytecode switch)
    GEMM_OPS,
    GRID_LIMITS,
    SMEM_OPTIN_LIMIT,
    approximate_instructions,
    hot_spill_instructions,
    parse_ptxas_log,
    print_table,  # noqa: E402
    tensor_core_instructions,
)

REPO = Path(__file__).resolve().parents[2]

# The fp32 cases of the GEMM-shaped ops (ptx_tools.GEMM_OPS) also run in TF32 mode
# (torch.set_float32_matmul_precision("high")); on sm_90 each of their kernels that calls tl.dot (itself
# or through a helper) must issue tensor-core instructions in TF32 mode and on bf16 inputs.
TENSOR_CORE_ARCH = 90
# ptxas may spill a few loop invariants of an outer loop (reloaded once per tile) even with registers to
# spare; what costs time is a spill inside an innermost loop (a GEMM's k-loop, a merge's rounds) or a
# large one, and both fail.
COLD_SPILL_BYTES = 64


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (one process each)")
    ap.add_argument(
        "--only",
        default=None,
        help="run only the cases whose name contains this (skips the every-kernel-launched check)",
    )
    ap.add_argument("--json", default=None, help="write the variants and failures here")
    ap.add_argument("--repo", default=str(REPO), help="the dpm_ops checkout to check")
    return ap.parse_args(argv)


# ---- one architecture, in this process ---------------------------------------------------------------------


@dataclass
class Variant:
    """One compiled specialisation and the cases that launched it."""

    kernel: str
    module: str
    arch: int
    signature: str
    constexprs: str
    specialisation: str
    regs: int
    spill_stores: int
    spill_loads: int
    hot_spills: int  # local-memory instructions in innermost loops (ptx_tools.hot_spill_instructions)
    smem: int
    warps: int
    stages: int
    tensor_cores: str  # the kinds of tensor-core instruction (ptx_tools.tensor_core_instructions); '' for none
    approximations: str  # approximate square roots / divisions in the PTX (ptx_tools.approximate_instructions)
    fp_fusion: bool  # compiled with FMA contraction, which every launch pins (_precision.COMPILE_OPTIONS)
    compile_s: float
    cases: list = field(default_factory=list)
    dtypes: set = field(default_factory=set)
    needs_tensor_cores: list = field(default_factory=list)  # the cases that require them


class Check:
    """The state of one architecture's run: the case being run, the variants, the failures."""

    def __init__(self, arch: int):
        self.arch = arch
        self.case = None
        self.variants = {}  # CompiledKernel.hash -> Variant
        self.launched = set()  # the JITFunctions run by some case
        self.failed = {}  # failure message -> (cause, the cases that hit it)
        self.notes = []

    def fail(self, cause: str, message: str, cases=()) -> None:
        self.failed.setdefault(f"sm_{self.arch} {message}", (cause, []))[1].extend(cases)

    @property
    def failures(self) -> list:
        return [
            f"{message} ({cases[0]}{f' and {len(cases) - 1} more' if len(cases) > 1 else ''})" if cases else message
            for message, (_, cases) in self.failed.items()
        ]

    def causes(self) -> dict:
        return dict(Counter(cause for cause, _ in self.failed.values()))


def import_triton_modules(repo: str) -> dict:
    """{short name: module} of every dpm_ops/triton/*.py, without dpm_ops/__init__ and dpm_ops/ops/__init__
    (which load the C++ extension): the launchers only need their own imports."""
    for name, sub in (("dpm_ops", "dpm_ops"), ("dpm_ops.ops", "dpm_ops/ops")):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(repo, sub)]
        sys.modules[name] = package
    sys.path.insert(0, repo)
    return {
        info.name: importlib.import_module(f"dpm_ops.triton.{info.name}")
        for info in pkgutil.iter_modules([os.path.join(repo, "dpm_ops", "triton")])
    }


def jit_functions(modules: dict) -> dict:
    """{JITFunction: short module name} of the @triton.jit functions each module defines."""
    from triton.runtime.jit import JITFunction

    return {
        obj: short
        for short, mod in modules.items()
        for obj in vars(mod).values()
        if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__
    }


def reached(kernel) -> set:
    """The kernel and the @triton.jit helpers it calls, transitively (names its code loads)."""
    from triton.runtime.jit import JITFunction

    seen, todo = set(), [kernel]
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        todo += [v for name in fn.fn.__code__.co_names if isinstance(v := fn.fn.__globals__.get(name), JITFunction)]
    return seen


def calls_dot(kernel) -> bool:
    return any("dot" in fn.fn.__code__.co_names for fn in reached(kernel))


def install_aot_launches(check: Check, owners: dict) -> None:
    """Make every kernel launch compile for check.arch instead of running."""
    import torch
    import triton
    import triton.runtime.jit as tjit
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class AheadOfTimeDriver:
        """Just enough of a GPU driver for JITFunction.run's warmup path: a target, no device."""

        target = GPUTarget("cuda", check.arch, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return check.arch  # keys Triton's per-device kernel cache

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(AheadOfTimeDriver())
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log: captured below
    triton_run = tjit.JITFunction.run

    def aot_run(self, *args, grid, warmup, **kwargs):  # warmup or not, nothing is launched
        name = self.fn.__name__
        check.launched.add(self)
        params = self.signature.parameters
        bound = self.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        grid = (tuple(grid(bound.arguments) if callable(grid) else grid) + (1, 1))[:3]
        if any(g > limit for g, limit in zip(grid, GRID_LIMITS)):
            check.fail("grid", f"{name}: grid {grid} over the limits {GRID_LIMITS}", [check.case.name])
        log = io.StringIO()
        start = time.time()
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:  # noqa: BLE001 (every compile error is reported, then the next case runs)
            check.fail("compile error", f"{name}: {compile_error_summary(error)}", [check.case.name])
            return None
        variant = check.variants.get(compiled.hash)
        if variant is None:
            variant = check.variants[compiled.hash] = new_variant(
                check, self, owners[self], compiled, log.getvalue(), time.time() - start
            )
        variant.cases.append(check.case.name)
        variant.dtypes.add(check.case.dtype)
        if check.arch == TENSOR_CORE_ARCH and owners[self] in GEMM_OPS and check.case.low_precision and calls_dot(self):
            variant.needs_tensor_cores.append(check.case.name)
        return compiled

    tjit.JITFunction.run = aot_run

    class MetaAutocast(torch.autocast):
        """torch.autocast knows no meta device: a launcher's torch.autocast(x.device.type, ...) gets the CPU's."""

        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = MetaAutocast


def compile_error_summary(error: Exception) -> str:
    """One line: the kernel source line a compile error points at, and its root cause. Triton chains a CompilationError
    (source excerpt, caret) per call level above the root (an AssertionError in tl.dot, a NameError...)."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    if type(root).__name__ == "CompilationError":  # raised by the code generator itself: message last
        message = str(root).strip().splitlines()[-1]
    else:  # e.g. a bare assert inside tl.dot: its source line says what failed
        frames = traceback.extract_tb(root.__traceback__)
        message = f"{type(root).__name__}: {str(root) or (frames[-1].line if frames else '')}"
    located = [e for e in chain if type(e).__name__ == "CompilationError"]
    if located:
        lines = str(located[-1]).splitlines()
        caret = next((i for i, line in enumerate(lines) if line.strip() == "^"), None)
        code = f" `{lines[caret - 1].strip()}`" if caret else ""
        message = f"{lines[0].rstrip(':')}{code}: {message}"
    return message[:300]


def new_variant(check: Check, fn, module: str, compiled, log: str, seconds: float) -> Variant:
    md = compiled.metadata
    usage = parse_ptxas_log(log).get(md.name)
    if usage is None:
        raise RuntimeError(f"no ptxas -v log for {md.name}: Triton's cache answered (TRITON_CACHE_DIR reused?)")
    src = compiled.src
    types_ = list(src.signature.values())
    constexprs = " ".join(
        f"{fn.arg_names[path[0]]}={value}"
        for path, value in sorted(src.constants.items())
        if len(path) == 1 and fn.params[path[0]].is_constexpr
    )
    # What else tells same-dtype variants apart: integer arguments equal to 1 (folded into constants)
    # or divisible by 16 (pointers are 16-byte aligned in every launch, so not shown).
    folded = [
        f"{fn.arg_names[path[0]]}={value}"
        for path, value in sorted(src.constants.items())
        if len(path) == 1 and not fn.params[path[0]].is_constexpr
    ]
    aligned = [
        f"{fn.arg_names[path[0]]}%16"
        for path, attr in sorted(src.attrs.items())
        if len(path) == 1 and attr and not types_[path[0]].startswith("*")
    ]
    return Variant(
        kernel=md.name,
        module=module,
        arch=check.arch,
        signature=",".join(types_),
        constexprs=constexprs,
        specialisation=" ".join(folded + aligned) or "-",
        regs=usage.regs,
        spill_stores=usage.spill_stores,
        spill_loads=usage.spill_loads,
        hot_spills=hot_spill_instructions(compiled.asm["sass"]) if usage.spills else 0,
        smem=md.shared,
        warps=md.num_warps,
        stages=md.num_stages,
        tensor_cores=tensor_core_instructions(compiled.asm["ptx"]),
        approximations=approximate_instructions(compiled.asm["ptx"]),
        fp_fusion=md.enable_fp_fusion,
        compile_s=round(seconds, 2),
    )


# ---- cases: the launchers at the shapes the library runs ------------------------------------------------


@dataclass
class Case:
    name: str
    op: str  # the dpm_ops/triton module
    dtype: str
    precision: str  # torch.set_float32_matmul_precision during the launch
    run: object
    operands: str  # the dtype its dots multiply in: the inputs' (`dtype`), or fp32 for a pass that takes it on purpose

    @property
    def low_precision(self) -> bool:
        return self.operands == "bf16" or (self.operands == "fp32" and self.precision == "high")


# Workloads (README's datasets): DPM trains Occluded-Duke's 702 identities with batches of 64 and
# 768-d ViT-B features; test gallery/query sizes; knn's k of re-ranking (k1 21, 50, 100) and the cap.
DPM_TRAIN = dict(B=64, K=702, C=768)
MASKED_COSINE_SHAPES = {
    "dpm train B64 K702 C768": (64, 702, 768),
    "occluded-duke test Q2210 G17661": (2210, 17661, 768),
    "msmt17 test Q11659 G82161": (11659, 82161, 768),
}
MARKET = (3368, 15913, 768)
MSMT17 = (11659, 82161, 768)
KNN_KS = (21, 50, 100, 256)
POOL_SHAPES = {
    "dpm global max pool (64,768,5,2)": [(64, 768, 5, 2)],  # the mask generator's last grid
    "maskreid 3 levels 36x14/18x7/9x4": [(64, 384, 36, 14), (64, 768, 18, 7), (64, 1536, 9, 4)],
}
MASKREID_MASK = (64, 1, 144, 56)  # the input size of MaskReID (144x56 foreground masks)
HEM_SHAPE = (64, 12, 210)  # (B, ViT-B heads, 21x10 patches)
RANKING_BATCH = (64, 256)  # MaskReID fine-tuning: 10 positives + 54 singles, 256-d embeddings

# The dtypes each launcher is given: the ops pass fp32/bf16/fp64 through, except knn (the op computes
# fp16/bf16 in fp32), masked ArcFace and the batch-hard triplet (the ops take fp32/fp64 only).
FLOATS = ("fp32", "bf16", "fp64")
FP32_FP64 = ("fp32", "fp64")
MASKED_COSINE_FLOATS = FLOATS + ("fp16",)  # its fp16 backward takes its own (TF32) coefficient path


def cases(mods: dict) -> list:
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    out = []

    def add(op, label, dtype_names, make, fp32_operands=False):
        """make(dtype) -> a callable running the launcher; fp32 GEMM-shaped cases run in TF32 mode too.
        `fp32_operands`: the launcher multiplies fp16 / bf16 inputs' operands in fp32, as fp32 inputs'."""
        for d in dtype_names:
            operands = "fp32" if fp32_operands and d in ("fp16", "bf16") else d
            precisions = ("highest", "high") if op in GEMM_OPS and operands == "fp32" else ("highest",)
            for p in precisions:
                mode = " tf32" if p == "high" else ""
                out.append(Case(f"{op} {label} {d}{mode}", op, d, p, make(dtypes[d]), operands))

    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")

    mc = mods["masked_cosine"]
    for label, (B, K, C) in MASKED_COSINE_SHAPES.items():
        add(
            "masked_cosine",
            f"fwd {label}",
            MASKED_COSINE_FLOATS,
            lambda d, B=B, K=K, C=C: (
                lambda: mc.masked_cosine_forward(t(B, C, dtype=d), t(B, C, dtype=d), t(K, C, dtype=d), 1e-12)
            ),
        )
    B, K, C = DPM_TRAIN.values()
    add(
        "masked_cosine",
        "bwd dpm train B64 K702 C768",
        MASKED_COSINE_FLOATS,
        lambda d: (
            lambda: mc.masked_cosine_backward(
                t(B, K, dtype=d), t(B, C, dtype=d), t(B, C, dtype=d), t(K, C, dtype=d), 1e-12
            )
        ),
        fp32_operands=True,
    )

    knn = mods["knn"]
    for label, (M, N, D), ks, metrics in (
        ("market M3368 N15913 D768", MARKET, KNN_KS, ("euclidean",)),
        ("market M3368 N15913 D768", MARKET, KNN_KS[:1], ("sqeuclidean", "cosine")),
        ("msmt17 M11659 N82161 D768", MSMT17, KNN_KS[:1], ("euclidean",)),
    ):
        for k in ks:
            for metric in metrics:
                add(
                    "knn",
                    f"{metric} {label} k{k}",
                    FP32_FP64,
                    lambda d, M=M, N=N, D=D, k=k, metric=metric: (
                        lambda: knn.knn_forward(t(M, D, dtype=d), t(N, D, dtype=d), k, metric)
                    ),
                )

    # self_knn (the same kernel, SELF) as re-ranking calls it: k1 20, 50, 100 kept with the tie margins
    # (m = k1 + 1 + 4 + 4), the query x gallery block written from the tiles.
    for label, (Q, G, D), ms, metrics in (
        ("market N19281 Q3368 D768", MARKET, (29, 59, 109), ("sqeuclidean",)),
        ("market N19281 Q3368 D768", MARKET, (29,), ("euclidean", "cosine")),
        ("msmt17 N93820 Q11659 D768", MSMT17, (29,), ("sqeuclidean",)),
    ):
        for m in ms:
            for metric in metrics:
                add(
                    "knn",
                    f"self {metric} {label} m{m}",
                    FP32_FP64,
                    lambda d, N=Q + G, D=D, Q=Q, m=m, metric=metric: (
                        lambda: knn.self_lists(t(N, D, dtype=d), m, metric, Q)
                    ),
                )

    # The certified k-NN's stage 1 (bf16 GEMM, bounds in the fp32 / fp64 compute dtype): knn at the knn
    # shapes, self_knn as re-ranking calls it (k1 20 + 5 raw neighbours kept, the row maxima collected)
    # and at larger k1. The rows per program follow M and k: the Market queries take 16, the
    # self_knn cases 64 (k <= 64) and 32.
    cert = mods["knn_certified"]
    market_all, msmt_all = MARKET[0] + MARKET[1], MSMT17[0] + MSMT17[1]
    for label, (M, N, D), k, self_pairs in (
        *(("knn market M3368 N15913 D768", MARKET, k, False) for k in (21, 256)),
        *(("self_knn market N19281 D768", (market_all, market_all, 768), k, True) for k in (25, 54, 104)),
        ("self_knn msmt17 N93820 D768", (msmt_all, msmt_all, 768), 25, True),
    ):
        for d in FP32_FP64:
            for metric in ("euclidean", "cosine") if k == 21 else ("euclidean",):

                def run(M=M, N=N, D=D, k=k, metric=metric, self_pairs=self_pairs, dt=dtypes[d]):
                    bf16 = torch.bfloat16
                    cert.stage1(
                        t(M, D, dtype=bf16),
                        t(N, D, dtype=bf16),
                        t(M, dtype=dt),
                        t(N, dtype=dt),
                        t(M),
                        t(N),
                        k,
                        max(256, 8 * k),
                        metric,
                        self_pairs,
                    )

                # bf16 GEMM either way: the fp32 cases are held to tensor-core instructions (GEMM_OPS)
                operands = "bf16" if d == "fp32" else d
                out.append(
                    Case(f"knn_certified {label} k{k} {metric} {d}", "knn_certified", d, "highest", run, operands)
                )

    # Stage 2's candidate distances: every certified row of self_knn at Market / MSMT17 scale, the cap's width.
    for label, n in (("market N19281", market_all), ("msmt17 N93820", msmt_all)):
        for d in FP32_FP64:
            for metric, self_pairs in (("euclidean", True), ("cosine", False)):

                def run(n=n, metric=metric, self_pairs=self_pairs, dt=dtypes[d], cap=256):
                    rows = t(n, 768, dtype=dt)
                    cert.candidate_distances(
                        rows,
                        rows,
                        t(n, dtype=dt),
                        t(n, dtype=dt),
                        t(n, dtype=torch.long),
                        t(n, cap, dtype=torch.long),
                        t(n, dtype=torch.int32),
                        metric,
                        self_pairs,
                    )

                name = f"knn_certified stage 2 {label} C256 {metric} {d}"
                out.append(Case(name, "knn_certified", d, "highest", run, d))

    arc = mods["masked_arcface"]
    for label, easy, plain_weight in (
        ("dpm train B64 K702 C768", False, 0.5),
        ("dpm train easy_margin no plain branch", True, 0.0),
    ):
        add(
            "masked_arcface",
            f"fwd+grads {label}",
            FP32_FP64,
            lambda d, easy=easy, plain_weight=plain_weight: (
                lambda: arc.loss_and_grads(
                    t(B, C, dtype=d),
                    t(B, C, dtype=d),
                    t(K, C, dtype=d),
                    t(B, dtype=torch.int64),
                    30.0,
                    0.5,
                    easy,
                    1e-7,
                    plain_weight,
                    1.0 - plain_weight,
                    True,
                )
            ),
        )

    pool = mods["hierarchical_mask_pool"]
    for label, levels in POOL_SHAPES.items():
        for mode in ("max", "avg"):
            for with_mask in (False, True):

                def make(d, levels=levels, mode=mode, with_mask=with_mask):
                    def run():
                        feats = [t(*shape, dtype=d) for shape in levels]
                        mask = t(*MASKREID_MASK, dtype=d) if with_mask else None
                        out = pool.hierarchical_mask_pool_forward(feats, mask, mode)
                        pool.hierarchical_mask_pool_backward(out, feats, mask, out, mode)

                    return run

                add("hierarchical_mask_pool", f"fwd+bwd {label} {mode} mask={with_mask}", FLOATS, make)

    triplet = mods["batch_hard_triplet"]
    add(
        "batch_hard_triplet",
        "loss+grad B64 C768",
        FP32_FP64,
        lambda d: lambda: triplet.loss_and_grad(t(B, C, dtype=d), t(B, dtype=torch.int64), True),
    )

    hem = mods["hem_loss"]
    add(
        "hem_loss",
        "fwd+bwd B64 H12 N210",
        FLOATS,
        lambda d: (
            lambda: (
                hem.hem_loss_forward(t(*HEM_SHAPE, dtype=d), 1e-6, "sum"),
                hem.hem_loss_backward(t(dtype=d), t(*HEM_SHAPE, dtype=d), 1e-6, "sum"),
            )
        ),
    )

    ranking = mods["maskreid_ranking_loss"]
    n, dim = RANKING_BATCH
    for pos_mode in ("hardest", "all_eq5", "eq4"):
        for neg_mode in ("literal",) if pos_mode == "eq4" else ("literal", "violating_only"):  # eq4: no hinge
            add(
                "maskreid_ranking_loss",
                f"n{n} D{dim} {pos_mode} {neg_mode}",
                FLOATS,
                lambda d, pos_mode=pos_mode, neg_mode=neg_mode: (
                    lambda: ranking.ranking_loss_forward(
                        t(n, dim, dtype=d), t(n, dtype=torch.int64), 0.15, 2.0, neg_mode, pos_mode
                    )
                ),
            )
    return out


def run_arch(args, arch: int) -> int:
    cache = tempfile.mkdtemp(prefix="triton-static-check-")
    os.environ["TRITON_CACHE_DIR"] = cache
    # Triton's default turned the other way: a launch that does not pin it compiles without FMA contraction
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        return check_arch(args, arch)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def check_arch(args, arch: int) -> int:
    start = time.time()
    import torch
    import triton

    modules = import_triton_modules(args.repo)
    owners = jit_functions(modules)
    check = Check(arch)
    install_aot_launches(check, owners)
    selected = [c for c in cases(modules) if args.only is None or args.only in c.name]
    for case in selected:
        check.case = case
        torch.set_float32_matmul_precision(case.precision)
        try:
            case.run()
        except Exception as error:  # noqa: BLE001 (the launcher's own code failed, not a compile)
            check.fail("launcher exception", f"launcher raised {type(error).__name__}: {str(error)[:300]}", [case.name])
    torch.set_float32_matmul_precision("highest")
    if args.only is None:
        covered = set().union(*(reached(fn) for fn in check.launched)) if check.launched else set()
        for fn in sorted(set(owners) - covered, key=lambda f: f.fn.__name__):
            check.fail("not launched", f"{owners[fn]}.{fn.fn.__name__}: no case launches it (add one to cases())")
    rows = judge_variants(check)
    seconds = time.time() - start
    print(
        f"== sm_{arch}: triton {triton.__version__}, torch {torch.__version__}, {len(selected)} cases, "
        f"{len(check.variants)} distinct variants"
    )
    print_table(
        rows,
        [
            "kernel",
            "dtype",
            "constexprs",
            "int args",
            "regs",
            "spill st/ld",
            "smem",
            "warps",
            "tensor cores",
            "launches",
            "compile s",
        ],
    )
    for note in check.notes:
        print(f"note: {note}")
    for failure in check.failures:
        print(f"FAIL: {failure}")
    causes = ", ".join(f"{cause} {n}" for cause, n in check.causes().items())
    print(
        f"== sm_{arch}: {len(check.variants)} variants, {len(check.failures)} failures"
        f"{f' ({causes})' if causes else ''}, {seconds:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "arch": arch,
                    "triton": triton.__version__,
                    "seconds": round(seconds, 1),
                    "variants": [dict(vars(v), dtypes=sorted(v.dtypes)) for v in check.variants.values()],
                    "failures": check.failures,
                    "causes": check.causes(),
                    "notes": check.notes,
                },
                f,
                indent=1,
            )
    return 1 if check.failures else 0


def judge_variants(check: Check) -> list:
    """Shared memory, spills and tensor cores of every variant: failures / notes, and the table rows."""
    limit = SMEM_OPTIN_LIMIT[check.arch]
    rows = []
    for v in sorted(check.variants.values(), key=lambda v: (v.module, v.kernel, v.signature, v.constexprs)):
        dtype = "/".join(sorted(v.dtypes))
        where = f"{v.kernel} {dtype} {v.constexprs} {v.specialisation}"
        if v.smem > limit:
            check.fail("shared memory", f"{where}: {v.smem} B shared memory > the opt-in limit {limit} B", v.cases)
        if v.spill_stores or v.spill_loads:
            message = f"{where}: spills {v.spill_stores} B stores / {v.spill_loads} B loads ({v.regs} registers)"
            if v.dtypes == {"fp64"}:
                check.notes.append(f"sm_{check.arch} {message} [fp64: not a failure]")
            elif not v.hot_spills and v.spill_stores + v.spill_loads <= COLD_SPILL_BYTES:
                check.notes.append(f"sm_{check.arch} {message} [none in an innermost loop: not a failure]")
            else:
                check.fail("spills", message, v.cases)
        if "fp64" in v.dtypes and "fp32" in v.signature.split(","):
            check.fail("fp32 scalar", f"{where}: fp32 scalar argument in an fp64 variant ({v.signature})", v.cases)
        if v.approximations:
            check.fail(
                "approximate arithmetic",
                f"{where}: {v.approximations} (fp32 tl.sqrt and / on a GPU): use _precision.sqrt_rn / div_rn",
                v.cases,
            )
        if not v.fp_fusion:
            check.fail(
                "fp fusion",
                f"{where}: compiled without FMA contraction (Triton's default): pass _precision.COMPILE_OPTIONS",
                v.cases,
            )
        if v.needs_tensor_cores and not v.tensor_cores:
            check.fail(
                "tensor cores",
                f"{where}: no tensor-core instruction (mma/wgmma) in TF32/bf16 mode",
                v.needs_tensor_cores,
            )
        rows.append(
            [
                v.kernel,
                dtype,
                v.constexprs,
                v.specialisation,
                v.regs,
                f"{v.spill_stores}/{v.spill_loads}",
                v.smem,
                v.warps,
                v.tensor_cores or "no",
                len(v.cases),
                v.compile_s,
            ]
        )
    return rows


# ---- several architectures: one child process each ------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in SMEM_OPTIN_LIMIT]
    if unknown:
        sys.exit(f"unknown architecture(s) {unknown}: known {sorted(SMEM_OPTIN_LIMIT)}")
    if len(archs) == 1:
        return run_arch(args, archs[0])
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for arch in archs:
            cmd = [
                sys.executable,
                __file__,
                "--arch",
                str(arch),
                "--repo",
                args.repo,
                "--json",
                os.path.join(tmp, f"{arch}.json"),
            ] + (["--only", args.only] if args.only else [])
            children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        codes = []
        for child in children:  # each child's output in one piece, in --arch order
            print(child.communicate()[0], end="", flush=True)
            codes.append(child.returncode)
        reports = [json.load(open(os.path.join(tmp, f"{a}.json"))) for a, c in zip(archs, codes) if c in (0, 1)]
    failures = sum(len(r["failures"]) for r in reports)
    crashed = [(a, c) for a, c in zip(archs, codes) if c not in (0, 1)]
    counts = " + ".join(f"sm_{r['arch']} {len(r['variants'])}" for r in reports)
    # a child killed by a signal (the OOM killer's 9) prints nothing: its code says what ended it
    ended = {c: f"signal {-c}" if c < 0 else f"exit {c}" for _, c in crashed}
    crash = f", crashed: {', '.join(f'sm_{a} ({ended[c]})' for a, c in crashed)}" if crashed else ""
    print(f"== triton static check: {counts} variants, {failures} failures{crash}, {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 2 if crashed else (1 if failures else 0)


if __name__ == "__main__":
    sys.exit(main())
