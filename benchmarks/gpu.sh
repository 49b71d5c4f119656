#!/usr/bin/env bash
# One short benchmark for a lent H100/H200: training-step MFU and decode tokens/s of the ~1.2 B Qwen-VL-shaped
# config (benchmarks/configs/gpu_1b.json), bf16, FlashAttention-2 if `flash_attn` is installed, else PyTorch SDPA.
# Expected wall time: 1-3 minutes (model built on the GPU, 13 training steps, 2 x 128-token decodes per batch size).
# Prints a table; writes $OUT/gpu_bench.json when OUT is set. `benchmarks/gpu.sh --dry-run` runs it on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" != "--dry-run" ]]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 540 python3 -m benchmarks.gpu "$@"
