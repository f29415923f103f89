#!/usr/bin/env bash
# The bench's GPU figures in one go (a few minutes on one H100/H200-class GPU), for a session that is lent one:
# step times (split / centralised, + encryption, + integrity audit), encryption of device tensors (copy to host
# + AES-GCM), strategy throughput (serial / batch_parallel / per_client at 1, 2, 4, 8 clients) and per_client
# memory 8/1, in bf16, on SmolLM2-135M and on random weights in the shapes of Llama-3.2-1B and Llama-3.1-8B
# (no download: the configs are bundled). Paste the printed tables into BENCHMARKS.md ("Engine cost" and "Scale").
#
#   bash .ci/gpu_bench.sh [OUTDIR]        # default OUTDIR: runs/gpu-bench; one log + one JSON line per model
set -euo pipefail
OUT="${1:-runs/gpu-bench}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
"$PY" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_bench.sh: no CUDA GPU visible (torch.cuda.is_available() is False); this script is for a GPU")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

run() {  # name, timeout seconds, bench arguments...
  local name="$1" limit="$2"; shift 2
  echo "=== $name: splitleak bench $* ==="
  timeout "$limit" "$PY" -m suite.cli bench --device cuda --dtype bfloat16 --no-remote "$@" 2>&1 | tee "$OUT/$name.log" \
    || echo "=== $name: failed or timed out (see $OUT/$name.log) ==="
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json" || true
}

# SmolLM2-135M (real weights from the local cache; the first run converts its GGUF once, ~30 s).
run smollm2-135m 240 --model smollm2-135m --batch-size 8 --max-length 128 --reps 10
# Llama-3.2-1B shapes, all 16 blocks.
run llama-1b 240 --model-config llama-1b --batch-size 8 --max-length 128 --reps 8
# Llama-3.1-8B shapes, all 32 blocks (bf16: ~16 GB of weights; one shared frozen copy for every variant).
run llama-8b 420 --model-config llama-8b --batch-size 4 --max-length 128 --reps 5 --strategy-clients 1 2 4 8
echo "logs and JSON lines in $OUT"
