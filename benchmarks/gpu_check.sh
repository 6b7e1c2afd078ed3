#!/usr/bin/env bash
# GPU paths on a CUDA machine: 16-mixed (fp16 autocast + GradScaler, unfused AdamW) and
# bf16-mixed, on the tiny model, through the real entry point; then the end-to-end tests.
# Usage on a GPU box with torch/lightning/transformers installed:
#   bash benchmarks/gpu_check.sh [wheel-dir-for-missing-packages]
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -n "${1:-}" ]; then
  python3 -m pip install --quiet --no-deps --no-build-isolation "$1"/*
fi
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 - <<'PY'
import torch, lightning, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("lightning", lightning.__version__, "transformers", transformers.__version__)
PY
for precision in 16-mixed bf16-mixed 32-true; do
  /usr/bin/time -f "$precision wall %e s" python3 -m llm_lightning.train model=tiny debug=smoke trainer=gpu \
    precision=$precision model.attn_implementation=sdpa hydra.run.dir="$OUT/run-$precision" \
    > "$OUT/run-$precision.log" 2>&1
  echo "precision=$precision exit=$? $(grep -E '^test/acc' "$OUT/run-$precision.log")"
  tail -3 "$OUT/run-$precision.log" | head -1
done
grep -h "wall" "$OUT"/run-*.log
