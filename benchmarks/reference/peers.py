"""The installed torchreid (0.2.5) and fast-reid (1.4.0) evaluation code, loaded file by file.

Their package `__init__`s import torchvision, faiss, tensorboard and more, so neither package is
imported: `find_spec` of a top-level package locates its directory without running its
`__init__`, and rank.py / rerank.py are executed from their files as stand-alone modules. Both
rank.py files try to import their Cython `evaluate_cy` and fall back to Python on ImportError;
loaded this way that import fails (torchreid's absolute import is blocked while the file runs,
fast-reid's relative one has no parent package), so the modules' `evaluate_rank` is the Python
code. fast-reid ships rank_cy.pyx (and roc_cy.pyx); `fastreid_cython()` compiles one with Cython and returns the
extension module (its `evaluate_cy` is what fast-reid's `evaluate_rank` calls when the Cython is
built). torchreid 0.2.5's sdist ships no rank_cy.pyx, so its users always run the Python code.

Nothing is patched: numpy 2 has `np.bool` again (the one removed alias these files use).
"""

import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

VERSIONS = {"torchreid": "0.2.5", "fastreid": "1.4.0"}
_FILES = {
    "torchreid_rank": ("torchreid", "reid/metrics/rank.py"),
    "torchreid_rerank": ("torchreid", "reid/utils/rerank.py"),
    "fastreid_rank": ("fastreid", "evaluation/rank.py"),
    "fastreid_rerank": ("fastreid", "evaluation/rerank.py"),
    "torchreid_distance": ("torchreid", "reid/metrics/distance.py"),
    "fastreid_query_expansion": ("fastreid", "evaluation/query_expansion.py"),
    "fastreid_roc": ("fastreid", "evaluation/roc.py"),  # imports faiss, which it does not use
}
INSTALL_HINT = "pip install --no-deps -r requirements-peers.txt"


def package_dir(package: str):
    """The installed package's directory, or None; the package itself is not imported."""
    spec = importlib.util.find_spec(package)
    return None if spec is None else Path(next(iter(spec.submodule_search_locations)))


def missing_reason(package: str):
    """Why the peer's code cannot be loaded here, or None."""
    try:
        installed = importlib.metadata.version(package)  # reads the dist-info, imports nothing
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != VERSIONS[package] or package_dir(package) is None:
        return f"{package}=={VERSIONS[package]} is not installed, found {installed} ({INSTALL_HINT})"
    return None


def _load(name: str, path: Path, provided: dict = {}):  # noqa: B006 (read, never changed)
    """The file at ``path`` run as a module, the peers' packages blocked; ``provided``: modules its imports get
    by their full names (files of a peer loaded this way, standing for their package's import path)."""
    spec = importlib.util.spec_from_file_location(f"_peer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    blocked = {package: sys.modules.get(package) for package in (*VERSIONS, *provided)}
    try:
        for package in VERSIONS:  # None in sys.modules: importing the package raises ImportError
            sys.modules[package] = None
        sys.modules.update(provided)  # found in sys.modules: their parent packages are never imported
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Cython evaluation is unavailable"
            spec.loader.exec_module(module)
    finally:
        for package, previous in blocked.items():
            if previous is None:
                del sys.modules[package]
            else:
                sys.modules[package] = previous
    return module


@functools.cache
def load(name: str):
    """One of the peers' files as a module ("torchreid_rank", "fastreid_rerank", ...); skips the
    calling test when the peer is not installed."""
    package, relative = _FILES[name]
    reason = missing_reason(package)
    if reason:
        pytest.skip(reason)
    return _load(name, package_dir(package) / relative)


@functools.cache
def torchreid_dataset(module: str):
    """torchreid's dataset module ``module`` ("viper", "grid", "cuhk03", ...), run from its file with the two files it
    imports as the modules it names: utils/tools.py (``read_json``, ``write_json``, for ``torchreid.reid.utils``,
    whose ``__init__`` imports cv2 and torchvision) and data/datasets/dataset.py (``ImageDataset``). Skips the
    calling test when torchreid (or what the module reads files with: scipy, h5py, imageio) is not installed."""
    reason = missing_reason("torchreid")
    if reason:
        pytest.skip(reason)
    needs = {"grid": ("scipy",), "cuhk03": ("h5py", "imageio", "scipy")}.get(module, ())
    for package in needs:  # what the module imports to read the release's files
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed ({INSTALL_HINT})")
    reid = package_dir("torchreid") / "reid"
    tools = _load("torchreid_tools", reid / "utils/tools.py")
    provided = {"torchreid.reid.utils": tools, "torchreid.reid.utils.tools": tools}
    base = _load("torchreid_dataset_base", reid / "data/datasets/dataset.py", provided)
    provided["torchreid.reid.data.datasets.dataset"] = base
    return _load(f"torchreid_{module}", reid / f"data/datasets/image/{module}.py", provided)


@functools.cache
def fastreid_compute_dist():
    """fast-reid's fastreid.utils.compute_dist (build_dist, compute_jaccard_distance), which needs faiss.
    Imported as a package module (its relative import of faiss_utils): fast-reid's own `__init__` and
    `utils/__init__` hold nothing but a version string."""
    reason = missing_reason("fastreid")
    if reason:
        pytest.skip(reason)
    if importlib.util.find_spec("faiss") is None:
        pytest.skip(f"faiss (faiss-cpu) is not installed ({INSTALL_HINT})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("fastreid.utils.compute_dist")


@functools.cache
def fastreid_cython(name: str = "rank_cy"):
    """fast-reid's rank_cylib/<name>.pyx ("rank_cy": evaluate_cy; "roc_cy": evaluate_roc_cy, which imports
    faiss) compiled (once per source, Cython and numpy version, in the temp dir) and loaded."""
    reason = missing_reason("fastreid")
    if reason:
        pytest.skip(reason)
    try:
        import Cython
    except ImportError:
        pytest.skip(f"Cython is not installed ({INSTALL_HINT})")

    source = package_dir("fastreid") / f"evaluation/rank_cylib/{name}.pyx"
    key = hashlib.sha256(source.read_bytes() + f"{Cython.__version__} {np.__version__} {sys.version}".encode())
    build_dir = Path(tempfile.gettempdir()) / f"dpm_ops-fastreid-{name}-{key.hexdigest()[:16]}"
    built = list(build_dir.glob(f"{name}*.so"))
    if not built:
        build_dir.mkdir(exist_ok=True)
        (build_dir / f"{name}.pyx").write_bytes(source.read_bytes())
        setup = (
            "from setuptools import Extension, setup; from Cython.Build import cythonize; import numpy; "
            f"setup(ext_modules=cythonize([Extension('{name}', ['{name}.pyx'], "
            "include_dirs=[numpy.get_include()])], quiet=True), script_args=['build_ext', '--inplace'])"
        )
        done = subprocess.run([sys.executable, "-c", setup], cwd=build_dir, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building fast-reid's {name}.pyx failed:\n{done.stderr[-4000:]}")
        built = list(build_dir.glob(f"{name}*.so"))
    loader = importlib.machinery.ExtensionFileLoader(name, str(built[0]))
    spec = importlib.util.spec_from_file_location(name, built[0], loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def fastreid_tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fprs=(1e-4, 1e-3, 1e-2), cython=False):
    """fast-reid's ReidEvaluator with TEST.ROC.ENABLED: its evaluate_roc (the Python code, or its Cython
    roc_cy), the real sklearn roc_curve, and the TPR of the first point nearest each FPR (numpy float64)."""
    try:
        from sklearn import metrics
    except ImportError:
        pytest.skip(f"scikit-learn is not installed ({INSTALL_HINT})")
    if cython:
        scores, labels = fastreid_cython("roc_cy").evaluate_roc_cy(distmat, q_pids, g_pids, q_camids, g_camids)
    else:
        roc = load("fastreid_roc")
        scores, labels = roc.evaluate_roc(distmat, q_pids, g_pids, q_camids, g_camids, use_cython=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's warning for a curve without negatives or positives
        fpr_curve, tpr_curve, _ = metrics.roc_curve(labels, scores)
    return np.array([tpr_curve[np.argmin(np.abs(fpr_curve - fpr))] for fpr in fprs])
