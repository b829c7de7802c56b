#!/usr/bin/env python
"""Time the whole ``auditor explain`` command at paper scale, against baselines in the same run.

    python bench/bench_explain_cli.py [--repeats 5] [--baseline-ref 26ee527] [--json out.json]

Data: bench/bench_invert.py's paper-scale set (N = 50,000 images, C = 1,481 concepts,
K = 512 float32 neurons), written once to --data (activations.npy, labels.npz).
Command timed (a fresh process each time, all included: interpreter start, imports,
loading, INVERT with L = 3, B = 3, statistics, results.json and neurons.csv):

    auditor explain -q --activations DIR/activations.npy --labels DIR/labels.npz \
        --length 3 --beam 3 --out OUT

Baselines, interleaved with the runs so that all see the same machine load:
* ``python -c "import torch"`` (what the CPU path no longer pays);
* with ``--baseline-ref REF``: the same command from the code at git revision REF
  (exported with ``git archive`` to a temp folder and imported from there: each variant
  starts as ``python -c BOOT explain ...``, where BOOT drops an editable install's import
  hook, puts the variant's folder first on sys.path, checks where ``auditor`` came from
  and calls ``auditor.cli.main``).

Reported per variant: median and all wall times, median CPU time (user + sys of the
child), peak RSS (ru_maxrss of the child), the 1-minute load average around each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOT = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
        "(getattr(f, '__module__', '') or '') + type(f).__module__]; sys.path.insert(0, {!r}); "
        "import auditor; assert auditor.__file__.startswith({!r}), auditor.__file__; "
        "from auditor.cli import main; sys.exit(main(sys.argv[1:]))")


def timed(cmd: list[str], env: dict) -> dict:
    """Wall time, CPU time and peak RSS of one child process (its own rusage, from wait4)."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile(mode="w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024, "load": load,
            "stderr_tail": stderr.strip().splitlines()[-1:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "auditor-bench-explain")
    ap.add_argument("--baseline-ref", default=None, help="git revision whose `auditor explain` is timed too")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    py = sys.executable
    if not (args.data / "activations.npy").exists():
        subprocess.run([py, str(ROOT / "bench" / "bench_invert.py"), "--repeats", "1", "--baseline-neurons", "1",
                        "--baseline-candidates", "2", "--save-dir", str(args.data)], check=True,
                       stdout=subprocess.DEVNULL)
    out = Path(tempfile.mkdtemp(prefix="bench-explain-out-"))
    explain = ["explain", "-q", "--activations", str(args.data / "activations.npy"),
               "--labels", str(args.data / "labels.npz"), "--length", "3", "--beam", "3"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def cli(code_dir: Path) -> list[str]:
        # `python -c BOOT explain ...`: the package from code_dir, whatever is installed (an editable
        # install's import hook would otherwise win over PYTHONPATH)
        return [py, "-c", BOOT.format(str(code_dir), str(code_dir))]

    variants = {"explain (this code)": ([*cli(ROOT), *explain, "--out", str(out / "new")], env),
                "python -c 'import torch'": ([py, "-c", "import torch"], env)}
    old = None
    if args.baseline_ref:
        old = Path(tempfile.mkdtemp(prefix="bench-explain-old-"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_ref, "auditor"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        variants[f"explain at {args.baseline_ref} (before)"] = ([*cli(old), *explain, "--out", str(out / "old")], env)
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    try:
        for name, (cmd, e) in variants.items():  # warm-up: file cache, .pyc files
            timed(cmd, e)
        for _ in range(args.repeats):
            for name, (cmd, e) in variants.items():
                runs[name].append(timed(cmd, e))
                print(f"{name}: {runs[name][-1]['wall_s']:.2f} s wall, {runs[name][-1]['cpu_s']:.2f} s CPU, "
                      f"load {runs[name][-1]['load']:.1f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    summary = {name: {"median_wall_s": statistics.median(r["wall_s"] for r in rs),
                      "walls_s": [round(r["wall_s"], 2) for r in rs],
                      "median_cpu_s": statistics.median(r["cpu_s"] for r in rs),
                      "maxrss_mb": max(r["maxrss_mb"] for r in rs),
                      "loads": [round(r["load"], 2) for r in rs],
                      "last_message": rs[-1]["stderr_tail"]} for name, rs in runs.items()}
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    result = {"command": " ".join(sys.argv), "machine": {"cpu": cpu, "cores": os.cpu_count(),
                                                         "python": platform.python_version()},
              "sizes": "N=50,000, C=1,481 (nnz 250,000), K=512, L=3, B=3", "repeats": args.repeats,
              "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "results": summary}
    print("| variant | median wall | runs (wall, s) | median CPU | max RSS | load (1-min) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in summary.items():
        print(f"| {name} | {s['median_wall_s']:.2f} s | {', '.join(map(str, s['walls_s']))} | "
              f"{s['median_cpu_s']:.2f} s | {s['maxrss_mb']:.0f} MB | {min(s['loads'])}–{max(s['loads'])} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
