"""The extension's source list (dpm_ops/_sources.py), as setup.py's CUDA build compiles it."""

from collections import Counter
from pathlib import Path

from dpm_ops import _sources

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_gets_its_own_object():
    # setup.py's build (torch's BuildExtension, through setuptools) names each object after its source
    # without the extension, so x_cuda.cpp and x_cuda.cu would both make x_cuda.o and ninja refuses the
    # whole CUDA build ("multiple rules generate"); the compile-on-first-import path and CMake do not
    # show it, and a CPU-only build has no .cu files.
    sources = _sources.sources(ROOT, with_cuda=True)
    assert any(source.endswith(".cu") for source in sources)
    objects = Counter(Path(source).relative_to(ROOT).with_suffix(".o") for source in sources)
    assert sorted(str(o) for o, n in objects.items() if n > 1) == []


def test_sanitize_switch_reaches_the_compile_and_link_lines(monkeypatch):
    # scripts/sanitize_cpu.sh's build: the sanitizer on every C++ object and on the link (which brings its
    # runtime), after Python's own -fwrapv (setup.py's compiler puts it first), not on nvcc's line
    monkeypatch.setenv("DPM_OPS_SANITIZE", "1")
    flags = _sources.compile_flags(with_cuda=True)
    assert flags["cxx"][-len(_sources.SANITIZE_FLAGS) :] == _sources.SANITIZE_FLAGS == flags["ldflags"][1:]
    assert not any("sanitize" in flag for flag in flags["nvcc"])
    monkeypatch.delenv("DPM_OPS_SANITIZE")
    assert not any("sanitize" in flag for flags in _sources.compile_flags(True).values() for flag in flags)
