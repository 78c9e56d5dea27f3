#!/usr/bin/env python3
"""GPU bring-up, within a time budget: build for sm_90, the certified k-NN benchmarks (issue 13's targets),
the CUDA/Triton tests file by file, the other kernel benchmarks, and, if time is left, the whole-model
benchmark. Run through scripts/gpu_check.sh.

Each test / benchmark file runs in its own process under a timeout (a CUDA error that poisons a
process costs one file). Results land in OUT as they come, so a killed run still returns what it
had: environment.txt, build.log, tests.log, benchmarks.log (with the cases' own prints), timings.jsonl
(a line per timed case as soon as it is timed: pytest-benchmark writes its JSON only when a file's
session ends), benchmarks.json, summary.json and summary.txt (at most 8 files, none over 16 MiB). A step
is skipped when the budget left is below what it needs; --steps runs some of them (a second call on a
warm machine: --steps tests,benchmarks, the build kept). --dry-run (CI, CPU): the same steps without
the build, every pytest collection-only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILES = 8
MAX_BYTES = 16 * 2**20
LOG_CAP = 15 * 2**20  # a log stops growing here, under MAX_BYTES
RESERVE_S = 10  # kept for the summary
# Steps' time limits (s): one file's tests / benchmarks, the build, the models benchmark; a step
# (or file) starts only with at least its MIN_ left.
BUILD_S, TEST_FILE_S, BENCH_FILE_S, MODELS_S = 240, 180, 120, 240
MIN_TEST_FILE_S, MIN_BENCH_FILE_S, MIN_MODELS_S = 30, 30, 150
DRY_RUN_MIN_FILE_S = 5  # one collection-only process
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
# The backend parameter ids (test_x[cuda], [triton]) and cuda-marked tests; not the CPU emulator's
# (tests/test_emulated_kernels.py), which needs no GPU.
SELECT_GPU_TESTS = "(cuda or triton) and not emulated"
STEPS = ("environment", "build", "certified", "tests", "benchmarks", "models")
CERTIFIED = "bench_knn_certified_gpu.py"  # issue 13's targets: first, the rest of the budget may not reach them
TIMINGS = "timings.jsonl"  # benchmarks/conftest.py's timed() appends a line per case to $DPM_OPS_TIMINGS


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="results folder (created)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: no build, every pytest step collection-only")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 420; dry run 80)")
    ap.add_argument("--jobs", type=int, default=None, help="test files at once (default: cores / 4, at most 4)")
    ap.add_argument(
        "--steps",
        type=lambda text: text.split(","),
        default=list(STEPS),
        help=f"comma-separated steps to run, in this order: {','.join(STEPS)} (default: all)",
    )
    args = ap.parse_args(argv)
    unknown = [name for name in args.steps if name not in STEPS]
    if unknown:
        ap.error(f"--steps: {', '.join(unknown)} not among {', '.join(STEPS)}")
    return args


class Run:
    """The deadline, the aggregate logs and the summary of one bring-up run."""

    def __init__(self, out: Path, budget: float, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.start = time.time()
        self.deadline = self.start + budget
        self.steps = []
        self.running = None  # the step under way, its files so far
        self.benchmarks = None  # benchmarks.json: the first file's header, every file's benchmarks
        self.lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)
        if any(out.iterdir()):  # the logs are appended to
            sys.exit(f"gpu_check: {out} is not empty")

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def append(self, name: str, text: str) -> None:
        path = self.out / name
        with self.lock:
            size = path.stat().st_size if path.exists() else 0
            if size >= LOG_CAP:
                return
            with open(path, "a") as f:
                f.write(text[: LOG_CAP - size])

    def record(self, step: dict) -> None:
        self.running = None
        self.steps.append(step)
        self.write_summary()

    def file_done(self, result: dict) -> None:
        with self.lock:
            self.running["files"].append(result)
            self.write_summary()

    def add_benchmarks(self, path: Path) -> None:
        with self.lock:
            data = json.loads(path.read_text())
            if self.benchmarks is None:
                self.benchmarks = data
            else:
                self.benchmarks["benchmarks"] += data["benchmarks"]
            (self.out / "benchmarks.json").write_text(json.dumps(self.benchmarks, indent=1))

    def write_summary(self) -> None:
        elapsed = round(time.time() - self.start, 1)
        steps = self.steps + ([self.running] if self.running else [])
        summary = {
            "dry_run": self.dry_run,
            "elapsed_s": elapsed,
            "budget_s": round(self.deadline - self.start),
            "steps": steps,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        lines = [f"gpu_check{' --dry-run' if self.dry_run else ''}: {elapsed} s of {summary['budget_s']} s"]
        for s in steps:
            counts = " ".join(f"{k}={v}" for k, v in s.get("counts", {}).items())
            notes = "; ".join(s.get("problems", [])) or s.get("reason", "")
            lines.append(f"{s['name']:<12} {s['status']:<9} {s['seconds']:>7.1f} s  {counts}{notes}")
            lines += [
                f"    {f['file']:<44} {f['status']:<9} {f['seconds']:>6.1f} s  "
                + " ".join(f"{k}={v}" for k, v in f["counts"].items())
                for f in s.get("files", [])
                if f["status"] != "ok"
            ]
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")


def run_command(cmd: list, timeout: float, env=None) -> tuple:
    """(status ok / failed / timeout, return code, output); on timeout the whole process group is
    killed (pytest, torch.compile workers)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output = proc.communicate(timeout=max(timeout, 1))[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return "timeout", None, proc.communicate()[0] + f"\n[killed after {timeout:.0f} s]\n"
    return ("ok" if proc.returncode == 0 else "failed"), proc.returncode, output


_COUNT = re.compile(
    r"(\d+)(?:/\d+)? (passed|failed|skipped|errors?|xfailed|xpassed|deselected|"
    r"(?:tests? )?collected)\b"
)


def pytest_counts(output: str) -> dict:
    """{'passed': 3, 'skipped': 1, ...} from pytest's last summary line."""
    for line in reversed(output.splitlines()):
        if found := _COUNT.findall(line):
            return {("errors" if name.startswith("error") else name.split()[-1]): int(n) for n, name in found}
    return {}


def run_pytest_files(
    run: Run, files: list, args: list, log: str, jobs: int, file_s: float, min_s: float, benchmarks=False
) -> dict:
    """Each file in its own pytest process (jobs at once; a dry run collects them all in one process),
    output appended to `log` and the summary updated file by file."""

    def one(paths):
        rel = " ".join(str(p.relative_to(REPO)) for p in paths)
        if run.left() < (DRY_RUN_MIN_FILE_S if run.dry_run else min_s):
            result = dict(file=rel, status="skipped", seconds=0.0, counts={}, reason="budget")
            run.file_done(result)
            return result
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            bench_json = Path(tmp, "b.json")
            # -s: the cases' prints (ratios, candidate sizes, profiles) reach the log as they come, a killed file's too
            extra = [f"--benchmark-json={bench_json}", "-s"] if benchmarks else []
            env = dict(os.environ, DPM_OPS_TIMINGS=str(run.out / TIMINGS)) if benchmarks else None
            status, code, output = run_command(
                [sys.executable, *PYTEST, *rel.split(), *args, *extra], min(file_s, run.left()), env
            )
            if bench_json.exists() and bench_json.stat().st_size:  # none when collecting only
                run.add_benchmarks(bench_json)
        if code == 5:  # pytest: no test selected in this file
            status = "empty"
        seconds = round(time.time() - start, 1)
        run.append(log, f"\n===== {rel}: {status} in {seconds} s ({' '.join([*PYTEST, *args])})\n{output}")
        result = dict(file=rel, status=status, seconds=seconds, counts=pytest_counts(output))
        run.file_done(result)
        return result

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(one, [files] if run.dry_run else [[f] for f in files]))
    totals = {}
    for r in results:
        for k, v in r["counts"].items():
            totals[k] = totals.get(k, 0) + v
    bad = [r for r in results if r["status"] in ("failed", "timeout")]
    status = "failed" if bad else ("skipped" if all(r["status"] == "skipped" for r in results) else "ok")
    return dict(status=status, counts=totals, files=results)


def step(run: Run, name: str, fn) -> None:
    start = time.time()
    run.running = dict(name=name, status="running", seconds=0.0, files=[])
    result = fn()
    run.record(dict(name=name, seconds=round(time.time() - start, 1), **result))
    print(f"[gpu_check] {name}: {result['status']} ({time.time() - start:.0f} s, {run.left():.0f} s left)", flush=True)


# The machine's interpreter, torch, GPU and the versions of what the steps use (None: not installed).
ENVIRONMENT_PROBE = """
import importlib.metadata, json, os, sys
import torch

def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None

used = ("triton", "numpy", "pybind11", "ninja", "pytest", "pytest-benchmark", "pytest-xdist", "hypothesis")
print(json.dumps(dict(
    python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
    gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, cores=os.cpu_count(),
    packages={name: version(name) for name in used},
)))
"""


def environment(run: Run) -> dict:
    status, _, output = run_command([sys.executable, "-c", ENVIRONMENT_PROBE], 60)
    text = output
    if shutil.which("nvidia-smi"):
        text += run_command(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], 30)[2]
    run.append("environment.txt", text)
    if status == "ok" and not run.dry_run and last_json(output)["gpu"] is None:
        return dict(status="failed", reason="torch sees no CUDA GPU")
    return dict(status=status)


def build(run: Run) -> dict:
    """The extension in place for sm_90 with every core (ninja from the interpreter's bin folder), then
    the backends it reports."""
    env = dict(
        os.environ,
        MAX_JOBS=str(os.cpu_count()),
        TORCH_CUDA_ARCH_LIST="9.0",
        FORCE_CUDA="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    status = "skipped"
    if not run.dry_run:
        status, _, output = run_command(
            [sys.executable, "setup.py", "build_ext", "--inplace"], min(BUILD_S, run.left()), env
        )
        run.append("build.log", output)
    probe = "import dpm_ops, json; print(json.dumps(dpm_ops.backends()))"
    probe_status, _, output = run_command([sys.executable, "-c", probe], 120)
    run.append("build.log", f"\n===== dpm_ops.backends()\n{output}")
    if status in ("ok", "skipped") and (probe_status != "ok" or not (run.dry_run or last_json(output)["cuda"][0])):
        status = "failed"
    return dict(status=status)


def last_json(output: str) -> dict:
    """The probe's JSON line (warnings may come around it)."""
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = args.budget or (80 if args.dry_run else 420)
    cores = os.cpu_count() or 1
    jobs = args.jobs or min(4, max(1, cores // 4))
    run = Run(Path(args.out).resolve(), budget, args.dry_run)
    collect = ["--collect-only"] if args.dry_run else []
    test_files = [p for p in sorted((REPO / "tests").glob("test_*.py")) if re.search(r"cuda|triton", p.read_text())]
    bench_files = sorted((REPO / "benchmarks").glob("bench_*.py"))
    models = REPO / "benchmarks" / "bench_models.py"  # torch.compile of whole models: last, if time is left
    certified = REPO / "benchmarks" / CERTIFIED
    kernels = [p for p in bench_files if p not in (models, certified)]

    def benchmarks(files, file_s, min_s):  # timed runs: one at a time
        return lambda: run_pytest_files(
            run, files, ["-m", "not slow", *collect], "benchmarks.log", 1, file_s, min_s, benchmarks=True
        )

    steps = {
        "environment": lambda: environment(run),
        "build": lambda: build(run),
        "certified": benchmarks([certified], BENCH_FILE_S, MIN_BENCH_FILE_S),
        "tests": lambda: run_pytest_files(
            run, test_files, ["-k", SELECT_GPU_TESTS, *collect], "tests.log", jobs, TEST_FILE_S, MIN_TEST_FILE_S
        ),
        "benchmarks": benchmarks(kernels, BENCH_FILE_S, MIN_BENCH_FILE_S),
        "models": benchmarks([models], MODELS_S, MIN_MODELS_S),
    }
    for name in STEPS:
        if name in args.steps:
            step(run, name, steps[name])

    files = [p for p in run.out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files > {MAX_FILES}"] if len(files) > MAX_FILES else []
    problems += [f"{p}: over {MAX_BYTES} B" for p in files if p.stat().st_size >= MAX_BYTES]
    problems += [f"{p}: more than two folders down" for p in files if len(p.relative_to(run.out).parts) > 3]
    run.record(dict(name="out-rules", seconds=0.0, status="failed" if problems else "ok", problems=problems))
    print((run.out / "summary.txt").read_text(), end="")
    return 1 if any(s["status"] in ("failed", "timeout") for s in run.steps) else 0


if __name__ == "__main__":
    sys.exit(main())
