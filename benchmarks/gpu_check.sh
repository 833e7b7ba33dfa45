#!/usr/bin/env bash
# The one prepared device check (issue 16): GPU tests, MFU of the paper's 579M Hyperloop and its
# depth-matched Transformer per attention backend, SDPA kernels, HC overhead and step overhead, on one GPU,
# in under 8 minutes. Every piece has its own time limit and the run goes on past a failed one; everything
# is tee'd to $OUT/gpu_check.log and the run ends with one table (also $OUT/gpu_check_table.txt).
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere; OUT defaults to ./gpu_check_out
#
# Needs python3 with torch (CUDA), megatron-core 0.16.1 and this project importable (`pip install -e .`).
# A checkout that is not installed is installed in editable mode from its own files, with nothing fetched.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.jsonl"
TABLE="$OUT/gpu_check_table.txt"
: >"$LOG"
: >"$JSON"
export PYTHONUNBUFFERED=1
RECIPE=recipes/hyperloop-579m.yaml
# The paper's 579M configuration on one GPU: micro-batch 4 x grad_accum 4 (mfu.py makes the layout one rank).
SHAPE=(train.micro_batch_size=4 train.grad_accum=4)
T0=$(date +%s)
SUMMARY=()

# piece NAME LIMIT_S CMD...: run with its own timeout, log it, record rc and seconds, never stop the run.
piece() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== [$name] (limit ${limit}s, at +$((start - T0))s): $*" | tee -a "$LOG"
    set +e
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    [[ $rc == 124 || $rc == 137 ]] && echo "=== [$name] TIMED OUT after ${limit}s" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-16s rc %-4s %4ss' "$name" "$rc" "$(($(date +%s) - start))")")
}

{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo none)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available())'
} 2>&1 | tee -a "$LOG"

if ! "$PY" -c 'import megatron.core, hyperloop_dist.data' >/dev/null 2>&1; then
    echo "=== installing this checkout (editable, --no-deps, nothing fetched)" | tee -a "$LOG"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3 | tee -a "$LOG" || true
fi
if ! "$PY" -c 'import hyperloop_dist.data' >/dev/null 2>&1; then
    # No usable setuptools there: link the three subpackages pyproject maps into the source tree instead
    # (untracked links, for this machine only).
    echo "=== editable install failed: linking hyperloop_dist/{data,evaluation,cluster}" | tee -a "$LOG"
    for pair in data:data_pipeline evaluation:eval cluster:cluster; do
        [[ -e hyperloop_dist/${pair%%:*} ]] || ln -s "../${pair#*:}" "hyperloop_dist/${pair%%:*}"
    done
fi
"$PY" -c 'import megatron.core, hyperloop_dist.data, hyperloop_dist.model.attention; print("imports ok")' 2>&1 \
    | tee -a "$LOG" || true

# Ordered by what the issue needs most, so a slow piece costs the least important figures.
# mfu rows: attention backend, then +hc / +blocks (model.compile) and +fused (every train.fusions switch).
piece sdpa_kernels 20 "$PY" benchmarks/sdpa_kernels.py --device cuda --batch 4 --heads 16 --seq 2048 --head-dim 128
piece mfu 140 "$PY" benchmarks/mfu.py "$RECIPE" --device cuda --kinds hyperloop transformer \
    --backends sdpa sdpa+fused local --steps 3 --warmup 2 --json "$JSON" "${SHAPE[@]}"
piece mfu_hc 60 "$PY" benchmarks/mfu.py "$RECIPE" --device cuda --kinds hyperloop \
    --backends sdpa+hc+fused --steps 3 --warmup 2 --json "$JSON" "${SHAPE[@]}"
piece mfu_blocks 90 "$PY" benchmarks/mfu.py "$RECIPE" --device cuda --kinds hyperloop transformer \
    --backends sdpa+blocks+fused --steps 3 --warmup 2 --json "$JSON" "${SHAPE[@]}"
piece hc_overhead 50 "$PY" benchmarks/hc_overhead.py "$RECIPE" --device cuda --steps 4 --warmup 2 \
    --json "$JSON" "${SHAPE[@]}" train.grad_accum=1 model.compile=hc
piece step_overhead 40 "$PY" benchmarks/step_overhead.py "$RECIPE" --device cuda --worlds 1 --kinds hyperloop \
    --steps 4 --warmup 2 --json "$JSON" "${SHAPE[@]}" train.grad_accum=1
piece gpu_tests 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fusions.py tests/test_compile.py

"$PY" - "$JSON" <<'EOF' 2>&1 | tee "$TABLE" | tee -a "$LOG" || true
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
mfu = [r for r in rows if "row" in r]
print("\n==== gpu_check table ====")
if mfu:
    r0 = mfu[0]
    print(f"{r0['recipe']} on {r0['device']}: micro-batch {r0['micro_batch']} x grad_accum {r0['grad_accum']}, "
          f"MFU vs {r0['peak_tflops']} TFLOP/s dense bf16")
    print("MFU full = train FLOPs/token (6N + 12*L*s*d attention, whole s x s square) x tok/s / peak; "
          "MFU causal = same with the attention term halved")
    print(f"{'kind/backend':<28}{'params':>9}{'ms/step':>9}{'tok/s':>9}{'MFU full':>9}{'MFU causal':>11}"
          f"{'peak GiB':>9}{'loss':>8}{'fwd':>5}{'bwd':>5}{'opt':>5}{'HCfwd':>6}{'vs paper':>9}")
    for r in mfu:
        peak = r["peak_tflops"] or float("nan")
        shares = "".join(f"{100 * r.get(k + '_share', float('nan')):>{w}.0f}%"
                         for k, w in (("forward", 4), ("backward", 4), ("optimizer", 4), ("hc_fwd", 5)))
        print(f"{r['row']:<28}{r['params'] / 1e6:>8.1f}M{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>9,.0f}"
              f"{100 * r['tflops'] / peak:>8.1f}%{100 * r['tflops_causal'] / peak:>10.1f}%"
              f"{r['peak_gib']:>9.1f}{r['loss']:>8.4f}{shares}{r['tokens_per_s'] / 44250:>8.2f}x")
    print("fwd/bwd/opt/HCfwd: shares of one device-synchronized step (mfu.py); "
          "paper: Hyperloop 579M, Table 1: 44,250 tok/s per H100 ('vs paper')")
for r in rows:
    if r.get("bench") == "hc_overhead":
        print(f"HC overhead (grad_accum 1): looped {r['looped_s'] * 1e3:.1f} ms, hyperloop "
              f"{r['hyperloop_s'] * 1e3:.1f} ms/step = {100 * (r['hyperloop_s'] / r['looped_s'] - 1):+.1f}%; "
              f"one HC {r['hc_s'] * 1e3:.2f} ms x {r['loops']} loops = {100 * r['hc_share']:.1f}% of the step "
              f"(middle pass {r['middle_s'] * 1e3:.1f} ms)")
    if r.get("bench") == "step_overhead":
        print(f"step overhead {r['kind']} DP{r['dp']}: bare PyTorch {r['bare_s'] * 1e3:.1f} ms, ours "
              f"{r['ours_s'] * 1e3:.1f} ms = {r['ours_s'] / r['bare_s']:.2f}x")
EOF
{
    echo "pieces:"
    printf '  %s\n' "${SUMMARY[@]}"
    echo "total $(($(date +%s) - T0))s"
} | tee -a "$TABLE" | tee -a "$LOG"
