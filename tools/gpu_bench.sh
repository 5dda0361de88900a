#!/usr/bin/env bash
# GPU step benchmark: `mimscale bench step` for MAE ViT-B/16 and ViT-L/16 at 224 px in bf16, from
# memory (pure compute, batch sweeps), and ViT-B from generated JPEG shards through the real loader.
# Also `bench masking` at ViT-L. Writes one JSON and one log per run under $OUT (default
# ./gpu_bench_out); about 9 minutes on one H200 (7 before the GPU-decode bench and tests). Assumes
# `python -m mimscale` works (mimscale and its dependencies installed).
#
#   OUT=/path/to/results bash tools/gpu_bench.sh
#   MIMSCALE_BENCH_DRY=1 bash tools/gpu_bench.sh   # the same runs with a tiny model on the CPU (checks the script)
set -uo pipefail

OUT="${OUT:-gpu_bench_out}"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)"                       # generated data: not copied back with the results
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export MIMSCALE_CACHE="$WORK/cache"

if [ -n "${MIMSCALE_BENCH_DRY:-}" ]; then
  MODEL_B=(model.name=mae_vit_tiny_patch16 model.img_size=32 model.patch_size=8 model.decoder_embed_dim=32
           model.decoder_depth=1 model.decoder_num_heads=2)
  MODEL_L=("${MODEL_B[@]}")
  ENGINE=(engine.precision=fp32 engine.device=cpu)
  BATCH_B=4,8 BATCH_L=4 BATCH_REAL=8 WARMUP=1 STEPS=2 IMAGES=64 SIDE=96 WORKERS=2 LIMIT=300
  MASK_ARGS=(--model mae_vit_tiny_patch16 --img-size 32 --batch 4 --rounds 1 --device cpu --rows gpa,sbam)
else
  MODEL_B=(model.name=mae_vit_base_patch16 model.img_size=224)
  MODEL_L=(model.name=mae_vit_large_patch16 model.img_size=224)
  ENGINE=(engine.precision=bf16 engine.device=cuda)
  BATCH_B=64,128,256 BATCH_L=64,128 BATCH_REAL=128 WARMUP=5 STEPS=30 IMAGES=3072 SIDE=384 WORKERS=14 LIMIT=90
  MASK_ARGS=(--model mae_vit_large_patch16 --img-size 224 --batch 32 --precision bf16 --rounds 6)
fi

# run NAME TIMEOUT_S ARGS...: one logged, time-limited command; a failure does not stop the others
run() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee "$OUT/$name.log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 8 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
}

{
  date -u; "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || echo "no nvidia-smi"
  nproc
} >"$OUT/env.txt" 2>&1

bench() {  # bench NAME TIMEOUT_S ARGS...: `mimscale bench step` writing $OUT/NAME.json
  local name=$1 limit=$2; shift 2
  run "$name" "$limit" "$PYTHON" -m mimscale bench step recipe=mae "${ENGINE[@]}" "$@" \
    --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/$name.json"
}

bench vitb_memory "$LIMIT" "${MODEL_B[@]}" --batch "$BATCH_B"
bench vitl_memory "$LIMIT" "${MODEL_L[@]}" --batch "$BATCH_L" --profile "$OUT/vitl_memory.profile.txt"

run write_shards 60 "$PYTHON" -m mimscale shards write --synthetic "$IMAGES" --synthetic-size "$SIDE" \
  --quality 90 --workers "$WORKERS" --no-progress "$WORK/shards"
bench vitb_real "$LIMIT" "${MODEL_B[@]}" data.source=wds "data.urls=$WORK/shards/index.json" \
  "data.num_workers=$WORKERS" data.decode=cpu --data real --batch "$BATCH_REAL" --profile "$OUT/vitb_real.profile.txt"
# the same JPEG shards decoded by nvJPEG in the training process (data.decode=gpu)
bench vitb_real_gpu_decode "$LIMIT" "${MODEL_B[@]}" data.source=wds "data.urls=$WORK/shards/index.json" \
  "data.num_workers=$WORKERS" data.decode=gpu --data real --batch "$BATCH_REAL" \
  --profile "$OUT/vitb_real_gpu_decode.profile.txt"
# the device decode against the worker's on this machine's GPU (nvJPEG pixels, geometry, no host sync)
[ -d tests ] && run gpu_decode_tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py
# every masking strategy's cost against MAE: FLOP ratio, time ratio, overhead (ViT-L, as the papers)
run masking "$((LIMIT + 90))" "$PYTHON" -m mimscale bench masking "${MASK_ARGS[@]}" --json "$OUT/masking.json"
# last, as its compile time is the least known: torch.compile of every block
bench vitl_compiled "$((LIMIT + 90))" "${MODEL_L[@]}" engine.compile=true --batch "$BATCH_L"

echo "results in $OUT:"; ls -l "$OUT"
