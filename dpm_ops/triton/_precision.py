"""The one rule for how the Triton GEMM tiles multiply, read from torch at every launch:

* float16 / bfloat16 inputs: tensor cores, operands in the input dtype, fp32 accumulation;
* float32: torch's fp32 matmul precision on CUDA, as its own matmuls (``cuda_fp32_matmul_is_tf32``): "highest"
  (the default) exact IEEE fp32 products, "high" / "medium" (or fp32_precision "tf32") TF32 tensor cores (fp32
  accumulation);
* float64: fp64 products.
"""

import torch
import triton
import triton.language as tl

from dpm_ops._precision import cuda_fp32_matmul_is_tf32

# Every launch's compile options, pinned rather than left to Triton's default: Triton 3.9 warns that
# its default turns FMA contraction off in 3.10, which would change the kernels' rounding. On, as the
# CUDA kernels compile (nvcc's --fmad default).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def dot_precision(dtype: torch.dtype) -> str:
    """The PRECISION constexpr of `dot` for kernel inputs of `dtype`."""
    if dtype in (torch.float16, torch.bfloat16):
        return "input"
    if dtype == torch.float32 and cuda_fp32_matmul_is_tf32():
        return "tf32"
    return "ieee"


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, in_t: tl.constexpr):
    """acc + a @ b; PRECISION "input": the operands in the fp16 / bf16 input dtype `in_t`."""
    if PRECISION == "input":
        acc = tl.dot(a.to(in_t), b.to(in_t), acc)
    else:
        # out_dtype spelled out: Triton 3.6 asserts it equals an fp64 accumulator's type (3.9 infers it)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION, out_dtype=acc.dtype)  # fp16 b: see masked cosine
    return acc


@triton.jit
def scalar_as(x, dtype: tl.constexpr):
    """A float argument declared `tl.float64` in the compute dtype. Undeclared, Triton would pass it as
    fp32, so fp64 input would meet fp32-rounded constants; adding it to a typed zero keeps its value
    under the interpreter too, where tl.cast of a Python float goes through fp32."""
    return (tl.zeros((), dtype) + x).to(dtype)


@triton.jit
def sqrt_rn(x):
    """The correctly rounded square root, as CUDA's sqrtf / sqrt and torch's: tl.sqrt is the fast
    approximate one for fp32 on a GPU (sqrt.approx, not monotone), which the interpreter's exact numpy
    sqrt hides; tl.sqrt_rn takes fp32 only, and fp64's tl.sqrt is correctly rounded."""
    if x.dtype == tl.float64:
        root = tl.sqrt(x)
    else:
        root = tl.sqrt_rn(x)
    return root


@triton.jit
def div_rn(x, y):
    """x / y correctly rounded, as torch and the CUDA kernels divide: fp32 `/` is div.full on a GPU
    (within 2 ulp), which the interpreter's exact numpy division hides; tl.div_rn takes fp32 only, and
    fp64's `/` is correctly rounded. A Python number takes the other operand's dtype, as with `/`."""
    q = x / y
    if q.dtype != tl.float64:
        minus_zero = -tl.zeros_like(q.to(tl.float32))  # v + (-0.0) is v for every v, -0.0 included
        q = tl.div_rn(x + minus_zero, y + minus_zero).to(q.dtype)
    return q


@triton.jit
def log1p(t):
    """log(1 + t) to a few ulps for small t too, as torch's log1p (Goldberg's trick; libdevice's log1p
    has no interpreter): log(1.0 + t) is 0 once t is below the dtype's half-ulp of 1."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, div_rn(tl.log(u) * t, tl.where(u == 1.0, 1.0, u - 1.0)))
