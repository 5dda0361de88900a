#!/usr/bin/env bash
# The GPU checks of one device session, in order of value, each time-limited so that one failure
# does not stop the rest. The whole run took about 7 minutes on one H200 before the packed-kernel
# masking runs and the loader and compile rows were added; the limits now sum to about 35 minutes
# (tests 2, mfu 2.5, compile 9.3, kernels 3, decode 6, loader 7, masking 4.5), so under a 10-minute
# cap per command run it in parts, most wanted first: ONLY="tests decode", then ONLY="compile",
# then ONLY="mfu masking", then ONLY="loader kernels":
#   1. the CUDA cases of the tests (no host sync under torch's sync debug mode; nvJPEG decode
#      against the worker path; packed == per-image);
#   2. `mimscale bench step` for MAE ViT-L/16 at 224 px in bf16 from memory with the defaults
#      (engine.compile=auto: compiled on CUDA) at batch 128, 256 and 512, with a profile; then
#      (compile) at batch 256 with the student compiled whole (engine.compile_scope=model) and with
#      the compile modes max-autotune-no-cudagraphs and reduce-overhead (engine.compile_mode);
#   3. the SDPA kernels (engine.attention) and compile on/off, ViT-B from memory;
#   4. ViT-B from generated JPEG shards through the real loader, decoded in the workers
#      (data.decode=cpu) and by nvJPEG (data.decode=gpu), each with the batch's host stage in the
#      training thread and in the staging thread (data.stage); then (loader) the loader alone both
#      ways, the pin thread, 4 batches per worker ahead, and a low-resolution phase's size;
#   5. `bench masking` at ViT-L: every strategy, the score-cache and packed rows (packed also with
#      the masked and flex kernels).
# Writes one JSON and one log per run under $OUT (default ./gpu_bench_out), and at the end every
# `bench step` row there as one markdown table (summary.md, also printed). Assumes `python -m
# mimscale` works (mimscale and its dependencies installed).
#
#   OUT=/path/to/results bash tools/gpu_bench.sh
#   ONLY="tests masking" bash tools/gpu_bench.sh   # some sections: tests mfu compile kernels decode loader masking
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
  LOWRES=(model.img_size=16)
  ENGINE=(engine.precision=fp32 engine.device=cpu)
  KERNELS=(math)
  BATCH_B=8 BATCH_L=4,8 BATCH_CM=4 BATCH_REAL=8 WARMUP=1 STEPS=2 IMAGES=64 SIDE=96 WORKERS=2 LIMIT=300
  DATA_ARGS=(--images 64 --image-size 96x96 --img-size 32 --batch-size 8 --batches 2 --rounds 1)
  MASK_ARGS=(--model mae_vit_tiny_patch16 --img-size 32 --batch 4 --rounds 1 --device cpu
             --rows "gpa,sbam_amr,cmae_2shot")
  TESTS=(-k "cpu and not cuda")
  VARLENS=(masked)
else
  MODEL_B=(model.name=mae_vit_base_patch16 model.img_size=224)
  MODEL_L=(model.name=mae_vit_large_patch16 model.img_size=224)
  LOWRES=(model.img_size=160)
  ENGINE=(engine.precision=bf16 engine.device=cuda)
  KERNELS=(auto flash efficient)
  BATCH_B=256 BATCH_L=128,256,512 BATCH_CM=256 BATCH_REAL=256 WARMUP=5 STEPS=25 IMAGES=4096 SIDE=384 WORKERS=15 LIMIT=75
  DATA_ARGS=(--images 2048 --image-size 384x384 --img-size 224 --batch-size 256 --batches 8 --rounds 2)
  MASK_ARGS=(--model mae_vit_large_patch16 --img-size 224 --batch 32 --precision bf16 --rounds 4)
  TESTS=(-k cuda)
  VARLENS=(masked flex)
fi

want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }  # want SECTION: is it to run?

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

# 1. the tests' CUDA cases (they are collected only where CUDA exists)
want tests && run tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_no_host_sync.py tests/test_gpu_decode.py \
  tests/test_data_stage.py \
  tests/test_packed.py tests/test_score_cache.py "${TESTS[@]}"

# 2. ViT-L with the defaults (compiled on CUDA): the MFU figure, and what holds it back
want mfu && bench vitl_memory "$((LIMIT + 75))" "${MODEL_L[@]}" --batch "$BATCH_L" --profile "$OUT/vitl_memory.profile.txt"

# 2b. how much of the step is compiled, and how (engine.compile_scope, engine.compile_mode), on the
#     same ViT-L step at batch 256: the student's forward as one graph, also replayed as CUDA graphs;
#     the blocks with fused matmul epilogues, and as CUDA graphs
if want compile; then
  for setting in model:default model:reduce-overhead blocks:max-autotune-no-cudagraphs blocks:reduce-overhead; do
    scope=${setting%%:*} mode=${setting#*:}
    bench "vitl_compile_${scope}_$mode" "$((LIMIT * 2 - 10))" "${MODEL_L[@]}" engine.compile=true \
      "engine.compile_scope=$scope" "engine.compile_mode=$mode" --batch "$BATCH_CM"
  done
fi

# 3. the measured defaults: SDPA kernel (uncompiled, so the kernel is all that differs), compile
if want kernels; then
  for k in "${KERNELS[@]}"; do
    bench "vitb_attn_$k" 40 "${MODEL_B[@]}" engine.compile=false "engine.attention=$k" --batch "$BATCH_B"
  done
  bench vitb_memory "$LIMIT" "${MODEL_B[@]}" --batch "$BATCH_B"
fi

# 4. from JPEG shards through the real loader: decoded in the workers, then by nvJPEG, each with the
#    batch's host stage in the training thread and in the staging thread (data.stage)
shards() {  # generated JPEG shards, written once per run of this script
  [ -f "$WORK/shards/index.json" ] || run write_shards 60 "$PYTHON" -m mimscale shards write --synthetic "$IMAGES" \
    --synthetic-size "$SIDE" --quality 90 --workers "$WORKERS" --no-progress "$WORK/shards"
  SHARDS=(data.source=wds "data.urls=$WORK/shards/index.json" "data.num_workers=$WORKERS" --data real)
}
if want decode; then
  shards
  bench vitb_real_cpu_decode "$LIMIT" "${MODEL_B[@]}" "${SHARDS[@]}" data.decode=cpu --batch "$BATCH_REAL"
  bench vitb_real_cpu_decode_thread "$LIMIT" "${MODEL_B[@]}" "${SHARDS[@]}" data.decode=cpu data.stage=thread \
    --batch "$BATCH_REAL"
  bench vitb_real_gpu_decode "$LIMIT" "${MODEL_B[@]}" "${SHARDS[@]}" data.decode=gpu --batch "$BATCH_REAL" \
    --profile "$OUT/vitb_real_gpu_decode.profile.txt"  # data.stage=auto: the staging thread
  bench vitb_real_gpu_decode_main "$LIMIT" "${MODEL_B[@]}" "${SHARDS[@]}" data.decode=gpu data.stage=main \
    --batch "$BATCH_REAL"
fi
# 4b. the other loader choices: where batches are pinned, how many each worker keeps ready
#     (data.pin_memory, data.prefetch_factor), and a low-resolution phase's step decoded by nvJPEG
if want loader; then
  # the loader alone: images/s of the workers decoding vs the main process decoding on the GPU
  run data_decode 120 "$PYTHON" -m mimscale bench data "${DATA_ARGS[@]}" --workers "$WORKERS" --rows wds,wds-gpu \
    --cache "$WORK/bench-data" --json "$OUT/data_decode.json"
  shards
  bench vitb_real_pin_thread "$LIMIT" "${MODEL_B[@]}" "${SHARDS[@]}" data.decode=cpu data.pin_memory=thread \
    --batch "$BATCH_REAL"
  bench vitb_real_prefetch4 "$LIMIT" "${MODEL_B[@]}" "${SHARDS[@]}" data.decode=cpu data.prefetch_factor=4 \
    --batch "$BATCH_REAL"
  bench vitb_real_lowres "$LIMIT" "${MODEL_B[@]}" "${LOWRES[@]}" "${SHARDS[@]}" data.decode=gpu --batch "$BATCH_REAL"
fi

# 5. every masking strategy's cost against MAE: FLOP ratio, time ratio, overhead (ViT-L, as the papers)
want masking && run masking 150 "$PYTHON" -m mimscale bench masking "${MASK_ARGS[@]}" --json "$OUT/masking.json"
# the packed rows with the other attention kernels (engine.varlen; the run above used auto = nested)
for kernel in "${VARLENS[@]}"; do
  want masking && run "masking_$kernel" 60 "$PYTHON" -m mimscale bench masking "${MASK_ARGS[@]}" \
    --rows sbam_amr,cmae_2shot --varlen "$kernel" --json "$OUT/masking_$kernel.json"
done

# every `bench step` row above in one table (summary.md): the figures a note or docs/performance.md needs
"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, pathlib, sys
pct = lambda v: "-" if v is None else f"{v:.1%}"
print("| run | model | batch | compile | data | images/s | step ms | MFU | data wait | device busy | peak GB |")
print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    rows = json.loads(path.read_text())
    for r in rows if isinstance(rows, list) else []:
        if not (isinstance(r, dict) and "data_wait_share" in r):  # not a `bench step` row
            continue
        if "error" in r:
            print(f"| {path.stem} | {r['model']} | {r['batch']} | | | {r['error']} | | | | | |")
            continue
        compiled = f"{r['compile_scope']}, {r['compile_mode']}" if r["compile"] else "off"
        data = r["data"] if r["data"] == "memory" else f"{r['decode']} decode, stage {r['stage']}"
        print(f"| {path.stem} | {r['model']} | {r['batch']} | {compiled} | {data} | {r['images_per_s']:,.0f} | "
              f"{r['step_ms']:.1f} | {pct(r['mfu'])} | {pct(r['data_wait_share'])} | {pct(r['device_busy_share'])} | "
              f"{r['peak_mem_gb']:.1f} |")
EOF

echo "results in $OUT:"; ls -l "$OUT"
