"""The device guard of every Triton launcher: Triton launches on the *current* CUDA device, not on
its tensors' (tensors on cuda:1 with cuda:0 current would run on the wrong GPU)."""

import functools

import torch


def _first_device(args):
    for arg in args:
        if isinstance(arg, (list, tuple)):  # the pooling launchers take a list of feature maps
            arg = next((t for t in arg if isinstance(t, torch.Tensor)), None)
        if isinstance(arg, torch.Tensor):
            return arg.device
    return None


def on_input_device(launcher, device_of: int = 0):
    """`launcher` run with the CUDA device current of its first tensor argument from position `device_of` on
    (1 for a backward whose first, a loss's gradient, is a number that may lie on any device)."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        device = _first_device(args[device_of:])
        if device is None or device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    return launch


# An H100 / H200 SXM's count: what launchers plan for without a GPU (the static check's meta tensors,
# the interpreter), so that they compile and test the variants such a GPU runs.
_PLANNED_MULTIPROCESSORS = 132


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of `device` (of the planned GPU when it is not a CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _PLANNED_MULTIPROCESSORS


def rows_per_program(M: int, most: int, device: torch.device) -> int:
    """`most` rows a program, halved (down to 16, tl.dot's smallest) while the grid would leave
    multiprocessors idle: for kernels whose programs each stream all the columns, so fewer rows a
    program mean more programs."""
    rows = most
    while rows > 16 and -(-M // rows) < multiprocessors(device):
        rows //= 2
    return rows
