#!/usr/bin/env bash
# Llama-3-8B-shaped LoRA training on one CUDA GPU (an H100): plain transformers + PEFT vs
# tunefix, in one run. Random weights in bf16 made on the GPU (no checkpoint, no tokenizer,
# nothing fetched), seq 2048 (rows of 1024-2048 tokens, dynamic padding), batch 2, gradient
# accumulation 4, LoRA r=32 on all linear layers; bf16 LoRA, and QLoRA (NF4) when
# bitsandbytes is importable. Prints tokens/s, peak VRAM and the longest context that
# trains (batch 1) for each side. The Python is bench/train.py and bench/context.py; this
# is the wrapper that gives each part a time limit, so the whole stays under 8 minutes:
# 150 + 150 + 170 s at the most.
#
#   bench/gpu.sh             # on the GPU machine, from anywhere
#   bench/gpu.sh --dry-run   # anywhere: builds the 8B shapes on the meta device, checks them
#
# PYTHON picks the interpreter (default: python3, the one that holds torch on the lent
# machines). Without a CUDA device the script stops at once with exit status 2.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=(--model llama3-8b --lora-r 32)

if [[ "${1:-}" == "--dry-run" ]]; then
    exec "$PY" bench/train.py "${MODEL[@]}" --dry-run --seq 2048 --batch 2
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: error: torch sees no CUDA device; this benchmark needs one GPU (see bench/RESULTS.md)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

failed=0
part() {  # part SECONDS SCRIPT ARGS...: one timed part; a failure is reported, the rest still runs
    local limit=$1
    shift
    echo "== [limit ${limit}s] $PY $*"
    timeout --kill-after=10 "$limit" "$PY" "$@"
    local rc=$?
    if ((rc != 0)); then
        echo "gpu.sh: FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ', timed out')): $*" >&2
        failed=1
    fi
}

TRAIN=(bench/train.py "${MODEL[@]}" --device cuda --seq 2048 --batch 2 --grad-accum 4 --warmup 1 --steps 3)
part 150 "${TRAIN[@]}"
if "$PY" -c 'import bitsandbytes' 2>/dev/null; then
    part 150 "${TRAIN[@]}" --quant 4bit
else
    echo "== QLoRA skipped: bitsandbytes is not importable with $PY"
fi
# Each side's search ends within 75 s (a probe still running then is killed, undecided)
# with the bracket it has; no probe runs past 60 s.
part 170 bench/context.py "${MODEL[@]}" --device cuda --start 8192 --max-seq 131072 \
    --granularity 1024 --time-budget 75 --probe-timeout 60
exit $failed
