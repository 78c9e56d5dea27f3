"""The one compute-dtype rule of dpm_ops: float64 stays float64, everything else (float32, float16,
bfloat16, integers) computes in float32. Every op, kernel launcher, loss and evaluation step takes
its compute dtype from compute_dtype (inputs may be bf16 / fp16 under autocast; float64 keeps the
reference tests exact). Standard torch only: the ops, losses, Triton launchers and evaluation all
import it."""

import contextlib
import functools
import threading

import torch


def compute_dtype(*operands) -> torch.dtype:
    """float64 when any operand (a tensor or a dtype) is float64, else float32."""
    dtypes = [o if isinstance(o, torch.dtype) else o.dtype for o in operands]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in its compute dtype (float32 and float64 tensors are returned as they are)."""
    return t.to(compute_dtype(t))


def common_at_least_fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """All tensors in their common compute dtype."""
    dtype = compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


# Autocast reaches into a custom op's kernels: its own torch matmuls would be recast to bf16 / fp16.
_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA
)


def without_autocast(kernel):
    """A custom op's Python kernel that runs its torch ops in the op's compute dtype under autocast, as
    the C++ kernels do (csrc/common/no_autocast.h, the same dispatch-key guard)."""

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # Dynamo cannot trace the guard (fullgraph failed), but autocast's switch
            with torch.autocast("cpu", enabled=False):
                if not torch.cuda.is_available():
                    return kernel(*args, **kwargs)
                with torch.autocast("cuda", enabled=False):
                    return kernel(*args, **kwargs)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return kernel(*args, **kwargs)

    return run


def sqrt_flat_at_zero(t: torch.Tensor) -> torch.Tensor:
    """√t (t ≥ 0) with gradient 0 at t = 0 instead of sqrt's infinite one, which times the zero
    gradient of a clamp before it would be NaN: the kernels' backward (and torch.cdist's) treat a
    zero distance or a clamped norm as constant."""
    positive = t > 0
    return torch.where(positive, torch.where(positive, t, 1.0).sqrt(), 0.0)


def cuda_fp32_matmul_is_tf32() -> bool:
    """Whether torch's fp32 CUDA matmuls run on TF32 tensor cores, read through the fp32_precision API (torch >= 2.9;
    set_float32_matmul_precision and allow_tf32 write it too, and cuBLAS reads it): the legacy getter raises once a
    program has set the new API ("a mix of the legacy and new APIs")."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


_SETTINGS_LOCK = threading.Lock()
_OVERRIDDEN: dict = {}  # (id(owner), name) -> [blocks open, the value before the first]


@contextlib.contextmanager
def process_setting(owner, name: str, value):
    """``owner.name = value`` (a process-wide torch setting) inside the block. Blocks open at once in several threads
    share one save, by the first to enter, and one restore, by the last to leave: each block's own save and restore
    gave a thread still inside another's block the value from before it, and the last to leave kept `value` for good."""
    key = (id(owner), name)
    with _SETTINGS_LOCK:
        held = _OVERRIDDEN.setdefault(key, [0, getattr(owner, name)])
        held[0] += 1
        setattr(owner, name, value)
    try:
        yield
    finally:
        with _SETTINGS_LOCK:
            held[0] -= 1
            if held[0] == 0:
                setattr(owner, name, _OVERRIDDEN.pop(key)[1])


@contextlib.contextmanager
def ieee_fp32_matmuls():
    """fp32 matmuls in IEEE precision inside the block: cuBLAS without TF32, oneDNN without its bf16 / TF32 modes
    (set_float32_matmul_precision("medium") runs CPU matmuls in bf16 passes). Through the fp32_precision API, as
    cuda_fp32_matmul_is_tf32; the settings are process-wide (process_setting), so matmuls other threads run meanwhile
    see them too."""
    with process_setting(torch.backends.cuda.matmul, "fp32_precision", "ieee"):
        with process_setting(torch.backends.mkldnn.matmul, "fp32_precision", "ieee"):
            yield
