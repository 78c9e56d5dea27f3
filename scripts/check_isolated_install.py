"""Plain `pip install .` path: the isolated build (no torch visible) must give a working package.

Builds the wheel with build isolation, installs it into a temporary folder, imports it from
there with an empty cache and checks that the ops compile on first import (announced on stderr)
and compute the right numbers.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys
# A developer's editable install of dpm_ops would answer for dpm_ops._C: leave it out.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
import torch, dpm_ops
from dpm_ops.ops import masked_cosine, masked_cosine_reference
assert dpm_ops.backends()["cpp"][0], dpm_ops.backends()
x, m, p = torch.randn(4, 9, dtype=torch.float64), torch.rand(4, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
torch.testing.assert_close(masked_cosine(x, m, p, backend="cpp"), masked_cosine_reference(x, m, p))
print("compiled on first import and matches the reference:", dpm_ops.__file__)
"""


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "wheels", str(ROOT)], check=True
        )
        wheel = next((tmp / "wheels").glob("dpm_ops-*.whl"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp / "site", wheel], check=True
        )
        assert not list((tmp / "site" / "dpm_ops").glob("_C*.so")), "isolated build should not compile"
        env = dict(os.environ, PYTHONPATH=str(tmp / "site"), DPM_OPS_CACHE_DIR=str(tmp / "cache"))
        result = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp, env=env, capture_output=True, text=True)
        print(result.stdout, result.stderr, sep="\n")
        assert result.returncode == 0, "import after a plain `pip install .` failed"
        assert "compiling the C++" in result.stderr, "the first-import compile was not announced"
        assert str(tmp / "site") in result.stdout, "imported the wrong dpm_ops"


if __name__ == "__main__":
    main()
