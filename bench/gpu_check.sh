#!/usr/bin/env bash
# The GPU figures in one short run, for the day a CUDA machine is lent (docs/gpu.md).
#
#   OUT=/path/to/results PYTHONPATH=. bash bench/gpu_check.sh
#
# Runs, each under its own time limit, writing everything under $OUT:
#   1. bench/bench_invert.py --device cuda        INVERT engine, whole layer at paper scale
#   2. bench/bench_activations.py throughput      collection vs a bare forward (float32, bf16 +
#      --device cuda                              channels_last, nvJPEG decoding)
#   3. bench/bench_activations.py precision       bf16 / fp16 activation error vs float32
#      --device cuda
#   4. pytest -m gpu                              the CUDA tests (CUDA engine == CPU engine, ...)
# Without CUDA, steps 1-3 are skipped (and say so) and step 4 reports its skips: the script
# still runs end to end, so it can be checked on any machine. Total worst case ~9 minutes.
set -u
OUT=${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT"
: > "$OUT/status.txt"

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log" >&2; }

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, output to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    log "start $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    log "end $name: rc=$rc after $((SECONDS - t0))s (124 = time limit)"
    echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$OUT/status.txt"
    tail -n 25 "$OUT/$name.txt" >&2
}

{
    echo "date: $(date -u)"; echo "uptime: $(uptime)"; echo "cores: $(nproc)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: none"
} > "$OUT/machine.txt"
"$PY" - > "$OUT/imports.txt" 2>&1 <<'EOF'
import importlib
for name in ("numpy", "scipy", "torch", "torchvision", "pandas", "pydantic", "yaml", "jinja2", "PIL", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 - a report, not a failure
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
try:
    import torch
    print("cuda available:", torch.cuda.is_available(), torch.version.cuda)
    if torch.cuda.is_available():
        print("device:", torch.cuda.get_device_name(0))
except Exception as exc:  # noqa: BLE001
    print("torch/cuda check failed:", exc)
EOF
cat "$OUT/machine.txt" "$OUT/imports.txt" >&2

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA" = "1" ]; then
    step invert_cuda 150 "$PY" bench/bench_invert.py --device cuda --repeats 5 --json "$OUT/invert_cuda.json"
    step activations_throughput_cuda 210 "$PY" bench/bench_activations.py throughput --device cuda \
        --n 1024 --n-vit 256 --n-files 512 --batch-size 128 --workers 8 --reps 3 --out "$OUT/activations_cuda.json"
    step activations_precision_cuda 90 "$PY" bench/bench_activations.py precision --device cuda \
        --n-precision 256 --out "$OUT/precision_cuda.json"
else
    log "no CUDA device here: the CUDA benchmarks (steps 1-3) are skipped"
    echo "cuda_benchmarks skipped (no CUDA)" >> "$OUT/status.txt"
fi
step pytest_gpu 120 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
log "done; results in $OUT"
cat "$OUT/status.txt" >&2
