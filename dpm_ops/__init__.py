"""dpm_ops: fused kernels and pipelines for occluded / mask-based person re-ID (DPM, MaskReID)."""

import os
import sys


def _run_as_command() -> bool:
    """Whether this process is the dpm-reid command: its script, or ``python -m dpm_ops``."""
    argv = sys.orig_argv
    module = argv[argv.index("-m") + 1 : argv.index("-m") + 2] if "-m" in argv else []
    return os.path.basename(sys.argv[0]) == "dpm-reid" or module == ["dpm_ops"]


try:
    from . import evaluation, ops
    from ._backend import backends
except KeyboardInterrupt:
    # Ctrl-C while torch imports, before the command's own handler exists (cli.main): its one line and exit
    # code; anything else importing dpm_ops gets the interrupt as it is.
    if not _run_as_command():
        raise
    print("dpm-reid: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

__version__ = "0.1.0"
__all__ = ["evaluation", "ops", "backends", "__version__"]
