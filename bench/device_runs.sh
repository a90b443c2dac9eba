#!/usr/bin/env bash
# The GPU machine's measurements, in stages that each fit one device call (<10 min):
#   bash bench/device_runs.sh STAGE...   (results under $OUT, default ./out; PACK=1: as one
#   $OUT/results.tgz, for the device tool, which brings back only the first few files)
# stages: gpu-tests | decode | decode-graphs | baseline | v2-lite | cpu-prefetch | cpu-sweep | prefill |
#   fp8-gemm | decode-depth | decode-gpu-experts | decode-full |
#   decode-full-ab | decode-threads | cpu-decode | cpu-amx | train-demo | engine-gpu-tests |
#   serve-v3a | serve-v3b | serve-v3c | serve-v2lite | serve-http | gpu-kernels | prefill-layer |
#   prefill-depth | cpu-decode-batch | prefill-profile | cpu-decode-skewed | gpu-step |
#   serve-http-v3 | serve-kernels-ab | sweeps | decode-gpu-int4 | gpu-step-tiles |
#   gpu-step-fused | decode-gpu-int4-trace | serve-c1-ab | cpu-decode-c64 |
#   serve-ring-ab | cpu-pairs-ab | serve-pairs-ab | serve-heavy-ab | decode-handover-ab | serve-policy-ab |
#   serve-pinned | fp8-unroll | gpu-step-timeline | router-ab | router-rank-ab | mla-splits | flashinfer | attention-ab | attention-batch | mla-small | attention-auto | auto-ratio | fp8-small | fp8-small-step | flashinfer-extend | gpu-step-ab | decode-gpu-int4-skewed | amx-pack-ab | amx-layout | amx-prefetch | cpu-decode-ab | amx-slabs | fi-extend-diag | amx-accept | fp8-small-low | amx-schedules | amx-int8-ab |
#   fp8-flashinfer | mla-flashinfer06
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
day=$(date +%F)

gpu_step_ab() {  # NAME FIRST: V3's GPU side alone at batch 1, this tree against base/ (`git
  # archive BASE hetero bench tests/data`, untracked so it travels), alternated twice starting
  # with side FIRST, the new side's first run under the profiler; rows tagged "side"
  local round side dir extra second=new
  [ "$2" = new ] && second=base
  for round in 1 2; do
    for side in "$2" "$second"; do
      dir=.; extra=""
      [ "$side" = base ] && dir=base
      [ "$side$round" = new1 ] && extra="--gpu-timeline $OUT/gpu_timeline"
      (cd "$dir" && timeout 200 python3 bench/decode.py --workload v3 --modes gpu_only \
        --batch 1 --context 16 --paged 64 --graphs --steps 20 --rounds 2 $extra) \
        2>> "$OUT/$1.err" | sed "s/^{/{\"side\": \"$side\", /" >> "$OUT/$1.jsonl"
    done
  done; tail -1 "$OUT/$1.err"; grep -c . "$OUT/$1.jsonl"
}

warm_decode() {  # ERR: one untimed V3 GPU step run at batch 1 and 32 x 4K (graphed), so a
  # fresh VM's Triton and flashinfer compiles do not eat a timed run's timeout (two runs were
  # lost that way on 2026-12-04)
  timeout 300 python3 bench/decode.py --workload v3 --modes gpu_only --batch 1,32 \
    --context 4096 --paged 64 --graphs --steps 2 --rounds 1 > /dev/null 2>> "$1"
}

flashinfer_wheels() {  # the carried .whl/ (flashinfer-python 0.5.3 and its two missing
  # dependencies) installed once, compiling for sm_90a only on all cores
  [ -d /tmp/site/flashinfer ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site FLASHINFER_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16
}

flashinfer06_wheels() {  # flashinfer-python 0.6.18 (.whl/fi06/: its SM90 block-scaled FP8
  # GEMM; the same MLA wrapper) with .whl/'s tvm-ffi and einops, apart from 0.5.3's /tmp/site
  [ -d /tmp/site06/flashinfer ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site06 .whl/fi06/*.whl .whl/apache_tvm_ffi-*.whl .whl/einops-*.whl
  export PYTHONPATH=/tmp/site06 FLASHINFER_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16
}

for stage in "$@"; do
  echo "== $stage ($(date +%T))"
  case $stage in
    cpu-decode-batch)  # issue 16: decode batches (T=16, 64: ~0.5-2 tokens an expert) on the
      # AMX tiles from 2, 4 or 8 tokens an expert against the GEMV (threshold 16), int4 g32 and
      # g128, alternated in one VM (~6 min): what reads the unique experts nearest host bandwidth
      for round in 1 2; do
        for min in 2 4 8 16; do
          timeout 70 python3 bench/cpu_moe.py --shape v3 --format int4,int4-g128 --tokens 16,64 \
            --no-naive --gemm-min-tokens-amx $min >> "$OUT/cpu_decode_batch.jsonl" \
            2>> "$OUT/cpu_decode_batch.err"
        done
      done; grep -c . "$OUT/cpu_decode_batch.jsonl" ;;
    cpu-decode-skewed)  # issue 16's read share in the serving regime: V3 serving's routing
      # (alpha 0.69: ~50 experts a layer at 16 tokens, ~109 at 64, 2.5-4.7 tokens each), the
      # AMX tiles from 4 or 8 tokens an expert against the GEMV, alternated (~5 min)
      for round in 1 2; do
        for min in 4 8 16; do
          timeout 80 python3 bench/cpu_moe.py --shape v3 --format int4,int4-g128 --tokens 16,64 \
            --no-naive --routing-alpha 0.69 --gemm-min-tokens-amx $min \
            >> "$OUT/cpu_decode_skewed.jsonl" 2>> "$OUT/cpu_decode_skewed.err"
        done
      done; grep -c . "$OUT/cpu_decode_skewed.jsonl" ;;
    cpu-decode-c64)  # issue 16's read share at concurrency 64 (0.61 in serving): one V3 layer,
      # int4-g32, 1 and 64 tokens of uniform routing (~222 experts, 2.3 tokens each), software
      # prefetch distance, work-item rows, 8 threads, huge pages, alternated; then the GEMV's
      # compute rate with ~18 tokens an expert (routing alpha 0.3, no GEMM paths) (~4 min)
      for round in 1 2; do
        for cfg in "" "--prefetch-bytes 0" "--prefetch-bytes 16384" "--rows-per-item 4" \
            "--threads 8" "--hugepages"; do
          timeout 100 python3 bench/cpu_moe.py --shape v3 --format int4 --tokens 1,64 --no-naive \
            $cfg >> "$OUT/cpu_decode_c64.jsonl" 2>> "$OUT/cpu_decode_c64.err"
        done
      done
      timeout 60 python3 bench/cpu_moe.py --shape v3 --format int4 --tokens 64,256 --no-naive \
        --routing-alpha 0.3 --gemm-min-tokens 100000 --gemm-min-tokens-amx 100000 \
        --gemm-min-tokens-q8 100000 \
        >> "$OUT/cpu_decode_c64.jsonl" 2>> "$OUT/cpu_decode_c64.err"
      grep -c . "$OUT/cpu_decode_c64.jsonl" ;;
    cpu-decode-ab)  # the decode GEMV's weights borrowed (simd_sync.borrowed: no shared
      # reference count a row) against base/ (`git archive BASE hetero bench tests/data`): one
      # V3 layer at 1, 4 and 16 tokens (serving's skew), int4 and int8, alternated twice (~4 min)
      for round in 1 2; do
        for side in new base; do
          dir=.; [ "$side" = base ] && dir=base
          (cd "$dir" && timeout 100 python3 bench/cpu_moe.py --shape v3 --format int4,int8 \
            --tokens 1,4,16 --no-naive --routing-alpha 0.69) 2>> "$OUT/cpu_decode_ab.err" \
            | sed "s/^{/{\"side\": \"$side\", \"round\": $round, /" >> "$OUT/cpu_decode_ab.jsonl"
        done
      done; tail -2 "$OUT/cpu_decode_ab.err"; grep -c . "$OUT/cpu_decode_ab.jsonl" ;;
    cpu-pairs-ab)  # the GEMV's gate/up (and down) rows in pairs a pass, against the code before
      # (base/: `git archive a7684e1 | tar -x -C base`, untracked so it travels): one V3 layer,
      # 16 and 64 tokens of serving's skew, and ~18 tokens an expert on the GEMV alone (its
      # compute rate), alternated (~6 min)
      for round in 1 2; do
        for root in base .; do
          echo "{\"root\": \"$root\", \"round\": $round}" >> "$OUT/cpu_pairs_ab.jsonl"
          timeout 100 python3 $root/bench/cpu_moe.py --shape v3 --format int4,int4-g128 \
            --tokens 1,16,64 --no-naive --routing-alpha 0.69 >> "$OUT/cpu_pairs_ab.jsonl" \
            2>> "$OUT/cpu_pairs_ab.err"
          timeout 60 python3 $root/bench/cpu_moe.py --shape v3 --format int4 --tokens 64 \
            --no-naive --routing-alpha 0.3 --gemm-min-tokens 100000 --gemm-min-tokens-amx 100000 \
            --gemm-min-tokens-q8 100000 >> "$OUT/cpu_pairs_ab.jsonl" 2>> "$OUT/cpu_pairs_ab.err"
        done
      done; grep -c . "$OUT/cpu_pairs_ab.jsonl" ;;
    decode-handover-ab)  # batch 1, whole V3, defer 3: the caller's shorter hand-over between a
      # layer's CPU result and the next layer's job (ring views made once, no zeros + add,
      # shared + deferred summed before the wait) against the code before it (base/: `git
      # archive 0fc1a8e hetero bench tests/data | tar -x -C base --exclude=hetero/demo/model.safetensors
      # --exclude=bench/results`), processes alternated new-base-new (~7 min)
      for root in . base .; do
        echo "{\"root\": \"$root\"}" >> "$OUT/decode_handover_ab.jsonl"
        timeout 150 python3 $root/bench/decode.py --workload v3 --cpu-layers 4 --batch 1 \
          --steps 12 --rounds 2 --modes gpu_only,defer3 --paged 64 --graphs --settle-s 10 \
          >> "$OUT/decode_handover_ab.jsonl" 2>> "$OUT/decode_handover_ab.err"
      done; grep -c . "$OUT/decode_handover_ab.jsonl" ;;
    gpu-step)  # issue 18: the V3 GPU side alone (whole depth, CPU experts as zeros), batch 1 and 32
      # at 16 and 4K tokens of context, over the engine's paged cache (the Triton kernels) with
      # CUDA graphs, and profiled eagerly; then batch 1 through the torch ops of MLA (~4 min)
      timeout 300 python3 bench/decode.py --workload v3 --modes gpu_only --batch 1,32 \
        --context 16,4096 --paged 64 --graphs --steps 20 --rounds 2 --profile "$OUT/gpu_step" \
        > "$OUT/gpu_step.jsonl" 2> "$OUT/gpu_step.err"; tail -2 "$OUT/gpu_step.err"
      timeout 150 python3 bench/decode.py --workload v3 --modes gpu_only --batch 1 \
        --context 16 --graphs --steps 20 --rounds 2 --attention absorbed \
        >> "$OUT/gpu_step.jsonl" 2>> "$OUT/gpu_step.err"; tail -2 "$OUT/gpu_step.err" ;;
    gpu-step-tiles)  # issue 18 (sixth session): the V3 GPU side alone after the router's bf16
      # product, split-K summed in the GEMV, context lengths read as positions; batch 1 and 32
      # with the default FP8 GEMV (one row on the CUDA cores), its 8-warp form, the MMA (~5 min)
      timeout 200 python3 bench/decode.py --workload v3 --modes gpu_only --batch 1,32 \
        --context 16,4096 --paged 64 --graphs --steps 20 --rounds 2 \
        --profile "$OUT/gpu_step_tiles" > "$OUT/gpu_step_tiles.jsonl" 2> "$OUT/gpu_step_tiles.err"
      for t in mma=0+num_warps=8 mma=0 mma=1; do
        timeout 100 python3 bench/decode.py --workload v3 --modes gpu_only --batch 1,32 \
          --context 16 --paged 64 --graphs --steps 20 --rounds 2 --fp8-tiles $t \
          >> "$OUT/gpu_step_tiles.jsonl" 2>> "$OUT/gpu_step_tiles.err"
      done; tail -2 "$OUT/gpu_step_tiles.err"; grep -c . "$OUT/gpu_step_tiles.jsonl" ;;
    gpu-step-fused)  # the sixth session's last GPU changes: their gpu tests, then V3's GPU
      # side alone with MLA's fused cache write (~3 min; 2026-12-04 it also ran the GEMV's
      # prefetch=1, 13.5 ms against 11.1: the option is gone)
      timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kv_write.py \
        tests/test_fp8_gemm.py tests/test_graphs.py tests/test_paged_cache.py \
        tests/test_gpu_router.py tests/test_gpu_norm.py 2>&1 \
        | tee "$OUT/$day-gpu-tests-fused.log" | tail -3
      for t in ""; do
        timeout 150 python3 bench/decode.py --workload v3 --modes gpu_only --batch 1 \
          --context 16 --paged 64 --graphs --steps 20 --rounds 2 --fp8-tiles "$t" \
          >> "$OUT/gpu_step_fused.jsonl" 2>> "$OUT/gpu_step_fused.err"
      done; tail -1 "$OUT/gpu_step_fused.err"; grep -c . "$OUT/gpu_step_fused.jsonl" ;;
    gpu-step-timeline)  # issue 18: every gpu test (the GEMV's unroll default), then V3's GPU
      # side alone at batch 1 x 16 and 32 x 4K, graphed, one step of each under torch.profiler:
      # where the step's time goes as it runs, idle time between kernels included (~6 min)
      timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests \
        --ignore tests/test_server.py --ignore tests/test_server_features.py \
        --ignore tests/test_server_fuzz.py 2>&1 | tee "$OUT/$day-gpu-tests.log" | tail -3
      for bc in "1 16" "32 4096"; do
        set -- $bc
        timeout 200 python3 bench/decode.py --workload v3 --modes gpu_only --batch "$1" \
          --context "$2" --paged 64 --graphs --steps 20 --rounds 2 \
          --gpu-timeline "$OUT/gpu_timeline" >> "$OUT/gpu_step_timeline.jsonl" \
          2>> "$OUT/gpu_step_timeline.err"
      done; tail -1 "$OUT/gpu_step_timeline.err"; grep -c . "$OUT/gpu_step_timeline.jsonl" ;;
    router-ab)  # issue 18: the decode router's launch settings (router_sweep), then V3's GPU
      # side alone at batch 1 against base/ (`git archive BASE hetero bench tests/data`,
      # untracked so it travels), alternated twice; the new side's first run under the
      # profiler with the whole step as one graph beside it (~6 min)
      timeout 150 python3 bench/router_sweep.py > "$OUT/router_sweep.jsonl" \
        2> "$OUT/router_sweep.err"; tail -1 "$OUT/router_sweep.err"
      gpu_step_ab router_ab base ;;
    router-rank-ab)  # issue 18: the router's top-k by rank against base/'s argmax rounds
      # (router_sweep --quick, 1 and 16 tokens), alternated twice (~1 min)
      for round in 1 2; do
        for side in new base; do
          dir=.; [ "$side" = base ] && dir=base
          (cd "$dir" && timeout 100 python3 bench/router_sweep.py --quick) \
            2>> "$OUT/router_rank_ab.err" | sed "s/^{/{\"side\": \"$side\", /" \
            >> "$OUT/router_rank_ab.jsonl"
        done
      done; tail -1 "$OUT/router_rank_ab.err"; grep -c . "$OUT/router_rank_ab.jsonl" ;;
    mla-splits)  # issue 18: mla_decode's splits of the context (split_count: one wave before
      # more splits) against the earlier rule and fixed counts, its pipeline depths, then V3's
      # GPU side at 32 x 4K against base/ (~4 min)
      timeout 150 python3 bench/mla_sweep.py --grid splits \
        --points 32x4096,32x8192,16x32768,64x4096,8x4096,1x4096 > "$OUT/mla_splits.jsonl" \
        2> "$OUT/mla_splits.err"; tail -1 "$OUT/mla_splits.err"
      timeout 100 python3 bench/mla_sweep.py --grid pipeline --points 32x4096,1x4096 \
        > "$OUT/mla_pipeline.jsonl" 2>> "$OUT/mla_splits.err"
      for side in new base; do
        dir=.; [ "$side" = base ] && dir=base
        (cd "$dir" && timeout 100 python3 bench/decode.py --workload v3 --modes gpu_only \
          --batch 32 --context 4096 --paged 64 --graphs --steps 20 --rounds 2) \
          2>> "$OUT/mla_splits.err" | sed "s/^{/{\"side\": \"$side\", /" \
          >> "$OUT/gpu_step_b32_ab.jsonl"
      done; grep -c . "$OUT/mla_splits.jsonl" "$OUT/gpu_step_b32_ab.jsonl" ;;
    flashinfer)  # issue 18: flashinfer's paged MLA kernel (carry .whl/: flashinfer-python
      # 0.5.3, apache-tvm-ffi, einops; it compiles its kernels with nvcc on first use): its
      # tests (the kernel and a decode step against mla_decode's), then mla_sweep's points
      # with it (~5 min)
      flashinfer_wheels
      start=$(date +%s)
      timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_flashinfer_mla.py 2>&1 \
        | tee "$OUT/$day-flashinfer-tests.log" | tail -3
      echo "flashinfer tests, its compile included: $(( $(date +%s) - start )) s"
      timeout 180 python3 bench/mla_sweep.py --grid splits --flashinfer \
        --points 32x4096,32x8192,64x4096,1x4096 > "$OUT/mla_flashinfer.jsonl" \
        2> "$OUT/mla_flashinfer.err"; tail -2 "$OUT/mla_flashinfer.err"
      grep -c . "$OUT/mla_flashinfer.jsonl" ;;
    attention-ab)  # issue 18: V3's GPU side, graphed, at 32 x 4K and 1 x 16, with MLA through
      # triton (W_UK / W_UV absorbed), triton-fp8 (read from kv_b_proj's FP8 blocks) and
      # flashinfer, alternated, each its own process; then 32 x 4K on base/ (`git archive
      # f28fdb0~1 hetero bench tests/data`: before the three small kernels fewer); then
      # mla_decode's tiles at batch 1, graphed (~9 min)
      flashinfer_wheels
      for bc in "32 4096" "1 16"; do
        set -- $bc
        for att in triton triton-fp8 flashinfer; do
          timeout 100 python3 bench/decode.py --workload v3 --modes gpu_only --batch "$1" \
            --context "$2" --paged 64 --graphs --steps 20 --rounds 2 --attention "$att" \
            >> "$OUT/attention_ab.jsonl" 2>> "$OUT/attention_ab.err"
        done
      done
      (cd base && timeout 100 python3 bench/decode.py --workload v3 --modes gpu_only \
        --batch 32 --context 4096 --paged 64 --graphs --steps 20 --rounds 2) \
        2>> "$OUT/attention_ab.err" | sed 's/^{/{"side": "base", /' >> "$OUT/attention_ab.jsonl"
      timeout 90 python3 bench/mla_sweep.py --grid tiles --points 1x64,1x4096 \
        > "$OUT/mla_tiles_graphed.jsonl" 2>> "$OUT/attention_ab.err"
      tail -1 "$OUT/attention_ab.err"; grep -c . "$OUT/attention_ab.jsonl" ;;
    attention-batch)  # issue 18: V3's GPU side, graphed, at batch 1 x 16 tokens, this tree
      # (mla_decode's 16-head programs where 64 leave SMs idle, no dense W_UK / W_UV) against
      # base/ (`git archive 15a1c3b hetero bench tests/data`), alternated twice; then triton
      # against flashinfer at 4, 8, 16 x 4K, alternated: where flashinfer starts to win (~8 min)
      flashinfer_wheels
      for round in 1 2; do
        for side in new base; do
          dir=.; [ $side = base ] && dir=base
          (cd $dir && timeout 60 python3 bench/decode.py --workload v3 --modes gpu_only \
            --batch 1 --context 16 --paged 64 --graphs --steps 20 --rounds 2) \
            2>> "$OUT/attention_batch.err" | sed "s/^{/{\"side\": \"$side\", /" \
            >> "$OUT/attention_batch.jsonl"
        done
      done
      for b in 4 8 16; do
        for att in triton flashinfer; do
          timeout 60 python3 bench/decode.py --workload v3 --modes gpu_only --batch $b \
            --context 4096 --paged 64 --graphs --steps 20 --rounds 2 --attention $att \
            >> "$OUT/attention_batch.jsonl" 2>> "$OUT/attention_batch.err"
        done
      done; tail -1 "$OUT/attention_batch.err"; grep -c . "$OUT/attention_batch.jsonl" ;;
    attention-auto)  # issue 18: the default attention ("auto": flashinfer's decode from 8 x 4K,
      # else mla_decode with head_block's tiles; no dense W_UK / W_UV) on V3's GPU side,
      # graphed: 1 x 16 against base/ (15a1c3b), 32 x 4K against triton, 8 x 4K; then every
      # gpu test, flashinfer's with it (~7 min)
      flashinfer_wheels
      for run in "new 1 16 auto" "base 1 16 triton" "new 32 4096 auto" "new 32 4096 triton" \
          "new 8 4096 auto"; do
        set -- $run
        dir=.; [ $1 = base ] && dir=base
        (cd $dir && timeout 70 python3 bench/decode.py --workload v3 --modes gpu_only \
          --batch $2 --context $3 --paged 64 --graphs --steps 20 --rounds 2 --attention $4) \
          2>> "$OUT/attention_auto.err" | sed "s/^{/{\"side\": \"$1\", /" \
          >> "$OUT/attention_auto.jsonl"
      done; tail -1 "$OUT/attention_auto.err"; grep -c . "$OUT/attention_auto.jsonl"
      timeout 240 python3 -m pytest -m gpu -v -p no:cacheprovider tests \
        --ignore tests/test_server.py --ignore tests/test_server_features.py \
        --ignore tests/test_server_fuzz.py 2>&1 | tee "$OUT/$day-gpu-tests.log" | tail -3 ;;
    auto-ratio)  # issue 18's batch-32 target in one VM: V3's GPU side, graphed, default
      # attention (auto), 1 x 16 and 32 x 4K alternated twice, then 32 x 4K once more under
      # the profiler (the kernels' table: what the 32-row step spends beyond batch 1) (~6 min)
      flashinfer_wheels
      warm_decode "$OUT/auto_ratio.err"
      for round in 1 2; do
        for bc in "1 16" "32 4096"; do
          set -- $bc
          timeout 100 python3 bench/decode.py --workload v3 --modes gpu_only --batch $1 \
            --context $2 --paged 64 --graphs --steps 20 --rounds 2 \
            >> "$OUT/auto_ratio.jsonl" 2>> "$OUT/auto_ratio.err"
        done
      done
      timeout 120 python3 bench/decode.py --workload v3 --modes gpu_only --batch 32 \
        --context 4096 --paged 64 --graphs --steps 20 --gpu-timeline "$OUT/gpu_timeline_b32" \
        >> "$OUT/auto_ratio_timeline.jsonl" 2>> "$OUT/auto_ratio.err"
      tail -1 "$OUT/auto_ratio.err"; grep -c . "$OUT/auto_ratio.jsonl" ;;
    fp8-small)  # issue 18: the swap-AB FP8 kernel for 17-64 rows (hetero.gpu.fp8_small): its
      # launch settings at 16, 32 and 64 rows against cuBLAS's block-scaled GEMM and the W8A16
      # kernel on V3's decode matrices, cold in L2 (~5 min)
      timeout 330 python3 bench/fp8_sweep.py --small \
        --shapes qkv_a,o,shared_gate_up,shared_down,q_b > "$OUT/fp8_small_sweep.jsonl" \
        2> "$OUT/fp8_small.err"; tail -1 "$OUT/fp8_small.err"; grep -c . "$OUT/fp8_small_sweep.jsonl" ;;
    fp8-flashinfer)  # issue 18's FP8 GEMM >= 1.3x bf16 at M >= 2048 (o_proj 1.13x through
      # cuBLAS): flashinfer 0.6's SM90 block-scaled GEMM (.whl/fi06/, DeepGEMM's design; nvcc
      # builds it first, ~2-4 min on a fresh VM), its gpu tests, every V3 matrix at 1..4096
      # rows beside cuBLAS and bf16, then 8K whole-depth prefill with each first (~8 min)
      flashinfer06_wheels
      ( time timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_prefill.py \
        -k library_block_scaled ) > "$OUT/$day-h200-fp8-flashinfer-tests.log" 2>&1
      tail -4 "$OUT/$day-h200-fp8-flashinfer-tests.log"
      timeout 240 python3 bench/gpu_kernels.py --only fp8 --out "$OUT/fp8_flashinfer.jsonl" \
        > /dev/null 2> "$OUT/fp8_flashinfer.err"; tail -2 "$OUT/fp8_flashinfer.err"
      timeout 280 python3 bench/prefill.py --only depth --chunk 32768 --pin-experts \
        --lengths 8192,8192 --fp8-gemms cublas flashinfer > "$OUT/prefill_fp8_flashinfer.jsonl" \
        2> "$OUT/prefill_fp8_flashinfer.err"; tail -2 "$OUT/prefill_fp8_flashinfer.err"
      cat "$OUT/prefill_fp8_flashinfer.jsonl" ;;
    mla-flashinfer06)  # issue 18's MLA decode >= 60% of copy bandwidth at 32 x 8K (0.505
      # through flashinfer 0.5.3): the same tests and points with flashinfer 0.6.18, its
      # extend route's model-level test among them (~5 min)
      flashinfer06_wheels
      timeout 330 python3 -m pytest -q -s -p no:cacheprovider tests/test_flashinfer_mla.py \
        tests/test_flashinfer_extend.py > "$OUT/$day-h200-flashinfer06-tests.log" 2>&1
      grep -E "layer by layer|passed|failed" "$OUT/$day-h200-flashinfer06-tests.log"
      timeout 180 python3 bench/mla_sweep.py --grid splits --flashinfer \
        --points 32x4096,32x8192,64x4096,1x4096 > "$OUT/mla_flashinfer06.jsonl" \
        2> "$OUT/mla_flashinfer06.err"; tail -2 "$OUT/mla_flashinfer06.err"
      grep -c . "$OUT/mla_flashinfer06.jsonl" ;;
    fp8-small-low)  # issue 18's >= 60% of HBM at M <= 16: fp8_small (tensor cores, swap-AB)
      # at 1, 4, 8 and 16 rows against the W8A16 GEMV the model uses there and cuBLAS, V3's
      # decode matrices cold in L2 (~2 min): if it leads at M = 1, batch 1's step can take it
      timeout 200 python3 bench/fp8_sweep.py --small --rows 1,4,8,16 \
        --shapes qkv_a,o,shared_gate_up,shared_down,q_b > "$OUT/fp8_small_low.jsonl" \
        2> "$OUT/fp8_small_low.err"; tail -1 "$OUT/fp8_small_low.err"; grep -c . "$OUT/fp8_small_low.jsonl" ;;
    fp8-small-step)  # issue 18: V3's GPU side at 32 x 4K with fp8_small on (--fp8-small 64,
      # fp8_small.SMALL_TILES: set them from the fp8-small sweep first) and off, alternated
      # twice (~6 min)
      flashinfer_wheels
      warm_decode "$OUT/fp8_small.err"
      for round in 1 2; do
        for small in 64 0; do
          timeout 100 python3 bench/decode.py --workload v3 --modes gpu_only --batch 32 \
            --context 4096 --paged 64 --graphs --steps 20 --rounds 2 --fp8-small $small \
            >> "$OUT/fp8_small_step.jsonl" 2>> "$OUT/fp8_small.err"
        done
      done; grep -c . "$OUT/fp8_small_step.jsonl" ;;
    flashinfer-extend)  # issue 18: flashinfer's kernel for extend steps (its GPU test against
      # the Triton kernels), then gpu_kernels' MLA section with flashinfer beside mla_decode and
      # mla_extend (--quick: decode 1 and 64 x 4K and 32K, a 512-token chunk after 0 and 16K)
      # (~4 min)
      flashinfer_wheels
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_flashinfer_extend.py 2>&1 \
        | tee "$OUT/$day-flashinfer-tests.log" | tail -2
      timeout 240 python3 bench/gpu_kernels.py --only mla --quick > "$OUT/mla_flashinfer_kernels.jsonl" \
        2> "$OUT/mla_flashinfer_kernels.err"; tail -1 "$OUT/mla_flashinfer_kernels.err" ;;
    mla-small)  # issue 18: mla_decode's tiles at small batches (head_block's rule: 16 heads a
      # program where 64 leave SMs idle), graphed; then every gpu test, flashinfer's with it
      # (~5 min)
      flashinfer_wheels
      timeout 200 python3 bench/mla_sweep.py --grid tiles --points 4x4096,8x1024,8x4096,16x1024 \
        > "$OUT/mla_tiles_small.jsonl" 2> "$OUT/mla_small.err"; tail -1 "$OUT/mla_small.err"
      timeout 300 python3 -m pytest -m gpu -v -p no:cacheprovider tests \
        --ignore tests/test_server.py --ignore tests/test_server_features.py \
        --ignore tests/test_server_fuzz.py 2>&1 | tee "$OUT/$day-gpu-tests.log" | tail -3 ;;
    gpu-step-ab)  # issue 18: every gpu test, then V3's GPU side alone at batch 1 against
      # base/ (`git archive BASE hetero bench tests/data`, untracked so it travels),
      # alternated twice, the new side's first run under the profiler (~8 min)
      timeout 240 python3 -m pytest -m gpu -v -p no:cacheprovider tests \
        --ignore tests/test_server.py --ignore tests/test_server_features.py \
        --ignore tests/test_server_fuzz.py 2>&1 | tee "$OUT/$day-gpu-tests.log" | tail -3
      gpu_step_ab gpu_step_ab new ;;
    decode-gpu-int4)  # issue 18: whole V3 depth at batch 1, routed experts all on the CPU
      # against 36 a layer on the GPU packed in int4 (the 80 GB config's 20 FP8 experts' bytes)
      # and 76 (what an H200 holds), one process each, alternated; random routers route
      # uniformly, so the GPU serves g/256 of the slots (no profile skew) (~8 min)
      for g in 0 36 76; do
        timeout 170 python3 bench/decode.py --workload v3 --cpu-layers 4 --gpu-experts $g \
          --gpu-format int4 --batch 1 --steps 12 --rounds 2 --modes gpu_only,overlap,defer3 \
          --graphs --settle-s 20 >> "$OUT/decode_gpu_int4.jsonl" 2>> "$OUT/decode_gpu_int4.err"
      done; grep -c . "$OUT/decode_gpu_int4.jsonl" ;;
    decode-gpu-int4-skewed)  # issue 18: decode-gpu-int4 with skewed routing, the GPU holding
      # each layer's hottest experts (a profile's placement): --routing-skew 0.05 gives 36
      # experts 28% of the slots and 76 53% (2x the uniform share; 0.025: 1.5x), measured in
      # each row (gpu_slot_share); paged cache, one process each, alternated (~8 min)
      for g in 0 36 76; do
        timeout 170 python3 bench/decode.py --workload v3 --cpu-layers 4 --gpu-experts $g \
          --gpu-format int4 --batch 1 --steps 12 --rounds 2 --modes gpu_only,overlap,defer3 \
          --paged 64 --graphs --settle-s 20 --routing-skew 0.05 \
          >> "$OUT/decode_gpu_int4_skewed.jsonl" 2>> "$OUT/decode_gpu_int4_skewed.err"
      done; grep -c . "$OUT/decode_gpu_int4_skewed.jsonl" ;;
    decode-gpu-int4-trace)  # the G = 76 row of decode-gpu-int4 over the paged cache, traced:
      # why the step fell only 4% when the CPU's own time fell 18% (~3 min)
      timeout 200 python3 bench/decode.py --workload v3 --cpu-layers 4 --gpu-experts 76 \
        --gpu-format int4 --batch 1 --steps 12 --rounds 2 --modes gpu_only,defer3 --paged 64 \
        --graphs --settle-s 10 --trace "$OUT/trace_g76" > "$OUT/decode_gpu_int4_trace.jsonl" \
        2> "$OUT/decode_gpu_int4_trace.err"; tail -2 "$OUT/decode_gpu_int4_trace.err" ;;
    sweeps)  # mla_decode's and fp8_gemm's launch settings (fp8: with the one-row CUDA-core
      # variant, Tiles(mma=False)), at V3's shapes (~3 min)
      timeout 90 python3 bench/mla_sweep.py > "$OUT/mla_sweep.jsonl" 2> "$OUT/mla_sweep.err"
      timeout 200 python3 bench/fp8_sweep.py --rows 1 > "$OUT/fp8_sweep.jsonl" \
        2> "$OUT/fp8_sweep.err"; tail -2 "$OUT/fp8_sweep.err" ;;
    serve-kernels-ab)  # issue 18: the serving engine on the whole V3 depth with MLA through
      # the Triton kernels against the torch ops, alternated, at concurrency 1, 16, 64 (~9 min)
      timeout 560 python3 bench/throughput.py --workload v3 --cpu-layers 4 \
        --concurrency 1,1,16,16,64,64 --requests 2,2,16,16,64,64 --attention-levels \
        triton,absorbed,triton,absorbed,triton,absorbed --prompt-len uniform:80,160 \
        --output-len fixed:12 --shared-prefix 64 --warmup 4 --settle-s 20 --naive 0 \
        > "$OUT/serve_kernels_ab.jsonl" 2> "$OUT/serve_kernels_ab.err"
      tail -3 "$OUT/serve_kernels_ab.err" ;;
    serve-c1-ab)  # serve-kernels-ab's unexplained c1 gap (triton TPOT 254 ms against 170):
      # four c1 levels alternating the two MLA paths, after the engine's batch-1 step against
      # bench/decode.py's on the default (triton) path (~5 min)
      timeout 420 python3 bench/throughput.py --workload v3 --cpu-layers 4 \
        --concurrency 1,1,1,1 --requests 3 --attention-levels triton,absorbed \
        --prompt-len uniform:80,160 --output-len fixed:24 --shared-prefix 64 --warmup 2 \
        --settle-s 10 --naive 0 --ab-rounds 2 --ab-steps 12 > "$OUT/serve_c1_ab.jsonl" \
        2> "$OUT/serve_c1_ab.err"; tail -3 "$OUT/serve_c1_ab.err" ;;
    serve-ring-ab)  # issue 16's read share at concurrency 16 and 64: CPU jobs of 16-64 tokens
      # on the engine's ring (EngineConfig.ring_tokens 64) against the worker's queue (15, as
      # before), alternated level by level; the ring's tests first on the AMX host (~8 min)
      timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_ring.py 2>&1 | tail -2
      timeout 480 python3 bench/throughput.py --workload v3 --cpu-layers 4 \
        --concurrency 16,16,64,64 --requests 16,16,64,64 --ring-levels 15,64,64,15 \
        --prompt-len uniform:80,160 --output-len fixed:12 --shared-prefix 64 --warmup 4 \
        --settle-s 10 --naive 0 > "$OUT/serve_ring_ab.jsonl" 2> "$OUT/serve_ring_ab.err"
      tail -3 "$OUT/serve_ring_ab.err" ;;
    serve-pairs-ab)  # issue 16's read share at concurrency 64 with the GEMV's paired rows,
      # against the code before them in another process (base/, made here: `git archive a7684e1
      # hetero bench tests/data | tar -x -C base --exclude=hetero/demo/model.safetensors
      # --exclude=bench/results`), concurrency 64, new-base-new (~8 min)
      for root in . base .; do
        echo "{\"root\": \"$root\"}" >> "$OUT/serve_pairs_ab.jsonl"
        timeout 190 python3 $root/bench/throughput.py --workload v3 --cpu-layers 4 \
          --concurrency 64 --requests 64 --prompt-len uniform:80,160 --output-len fixed:12 \
          --shared-prefix 64 --warmup 4 --settle-s 5 --read-bw-gb 2 --naive 0 \
          >> "$OUT/serve_pairs_ab.jsonl" 2>> "$OUT/serve_pairs_ab.err"
      done; grep -c . "$OUT/serve_pairs_ab.jsonl" ;;
    serve-heavy-ab)  # with the paired-row GEMV, which experts the ring hands to the AMX tiles:
      # those of 16 tokens (the GEMM threshold), of 32, or none, concurrency 64 (~7 min)
      timeout 400 python3 bench/throughput.py --workload v3 --cpu-layers 4 \
        --concurrency 64,64,64 --requests 64,64,64 --ring-heavy-levels 16,32,0 \
        --prompt-len uniform:80,160 --output-len fixed:12 --shared-prefix 64 --warmup 4 \
        --settle-s 5 --read-bw-gb 2 --naive 0 > "$OUT/serve_heavy_ab.jsonl" \
        2> "$OUT/serve_heavy_ab.err"; tail -2 "$OUT/serve_heavy_ab.err" ;;
    serve-policy-ab)  # concurrency 64 with the CPU experts page-locked: decode steps of 32+
      # tokens ask the policy which experts the GPU streams (32) or only long chunks do (128),
      # alternated ABA in one process after the calibration (~4 min on a fresh VM)
      timeout 560 python3 bench/throughput.py --workload v3 --cpu-layers 4 --pin-experts \
        --concurrency 64,64,64 --requests 64,64,64 --policy-levels 128,32,128 \
        --prompt-len uniform:80,160 --output-len fixed:12 --shared-prefix 64 --warmup 4 \
        --settle-s 5 --read-bw-gb 2 --naive 0 > "$OUT/serve_policy_ab.jsonl" \
        2> "$OUT/serve_policy_ab.err"; tail -3 "$OUT/serve_policy_ab.err" ;;
    serve-pinned)  # issue 16's table with the CPU experts page-locked (decode steps of 16+
      # tokens ask the policy): concurrency 1, 4, 16, 64 and the batch-1 A/B (~6 min)
      timeout 560 python3 bench/throughput.py --workload v3 --cpu-layers 4 --pin-experts \
        --concurrency 1,4,16,64 --requests 4,8,16,64 --ab-rounds 2 \
        --prompt-len uniform:80,160 --output-len fixed:12 --shared-prefix 64 --warmup 4 \
        --settle-s 5 --read-bw-gb 2 --naive 0 > "$OUT/serve_pinned.jsonl" \
        2> "$OUT/serve_pinned.err"; tail -3 "$OUT/serve_pinned.err" ;;
    fp8-unroll)  # issue 18: the one-row FP8 GEMV with 1, 2 or 4 K blocks an iteration, block_n
      # 32 and 64, on V3's decode matrices cold in L2 (copies over 512 MB, ~2 min)
      timeout 200 python3 bench/fp8_sweep.py --rows 1 --k-unroll 1,2,4 --cold-mb 512 \
        > "$OUT/fp8_unroll.jsonl" 2> "$OUT/fp8_unroll.err"; tail -2 "$OUT/fp8_unroll.err" ;;
    serve-http-v3)  # serve-http's whole-V3 half alone (~5.5 min)
      timeout 330 python3 bench/serving_http.py --workload v3 --cpu-layers 4 --concurrency 1,16 \
        --requests 2,16 --prompt-len uniform:80,160 --output-len fixed:12 --warmup 4 \
        --shared-prefix 64 --naive 0 > "$OUT/serve_http_v3.jsonl" 2> "$OUT/serve_http_v3.err"
      tail -2 "$OUT/serve_http_v3.err" ;;
    gpu-kernels)  # FP8 GEMM, MLA decode/extend, fused MoE, router at V3 shapes (~4 min)
      timeout 540 python3 bench/gpu_kernels.py --out "$OUT/gpu_kernels.jsonl" \
        > /dev/null 2> "$OUT/gpu_kernels.err"; tail -3 "$OUT/gpu_kernels.err" ;;
    prefill-layer)  # one V3 layer's CPU experts streamed: staged vs whole vs CPU (~4 min)
      timeout 500 python3 bench/prefill.py --only layer > "$OUT/prefill_layer.jsonl" \
        2> "$OUT/prefill_layer.err"; tail -3 "$OUT/prefill_layer.err" ;;
    prefill-depth)  # whole V3 depth TTFT at 512..32K, then once over HTTP (~8 min; needs the
      # server's wheels): a prompt in one chunk streams each layer's experts once
      timeout 580 python3 bench/prefill.py --only depth --http --chunk 32768 --pin-experts \
        > "$OUT/prefill_depth.jsonl" 2> "$OUT/prefill_depth.err"; tail -3 "$OUT/prefill_depth.err" ;;
    prefill-profile)  # 8K and 32K once more with their prediction, then 8K under torch.profiler:
      # where the time the prediction misses goes (~3 min)
      timeout 280 python3 bench/prefill.py --only depth --chunk 32768 --pin-experts \
        --lengths 8192,32768 --profile "$OUT/prefill_profile" > "$OUT/prefill_profile.jsonl" \
        2> "$OUT/prefill_profile.err"; tail -3 "$OUT/prefill_profile.err" ;;
    gpu-tests)  # the tests marked gpu, log committed under tests/logs/ (~3 min; the server's
      # wheels for the grammar tests; the server test files import openai/schemathesis, absent
      # there, and hold no gpu test; flashinfer's with them where .whl/ was carried)
      ls .whl/flashinfer_python-*.whl > /dev/null 2>&1 && flashinfer_wheels
      timeout 300 python3 -m pytest -m gpu -v -p no:cacheprovider tests \
        --ignore tests/test_server.py --ignore tests/test_server_features.py \
        --ignore tests/test_server_fuzz.py 2>&1 | tee "$OUT/$day-gpu-tests.log" | tail -5 ;;
    decode)  # v3-slice: sequential / overlap / deferral at batch 1, 4, 16, profiler tables, and
      # in the same run transformers' device_map baseline
      timeout 540 python3 bench/decode.py --workload v3-slice --moe-layers 3 --batch 1,4,16 \
        --steps 12 --profile "$OUT/profile" --baseline > "$OUT/decode_v3slice.jsonl" \
        2> "$OUT/decode.err"
      tail -3 "$OUT/decode.err" ;;
    decode-graphs)  # the same modes with each layer's GPU segments replayed from CUDA graphs (~60 s)
      timeout 280 python3 bench/decode.py --workload v3-slice --moe-layers 3 --batch 1,4,16 \
        --steps 12 --graphs > "$OUT/decode_v3slice_graphs.jsonl" 2> "$OUT/decode_graphs.err"
      tail -3 "$OUT/decode_graphs.err" ;;
    baseline)  # only transformers + accelerate device_map, experts on "cpu"
      timeout 400 python3 bench/decode.py --baseline-only --steps 2 > "$OUT/baseline.jsonl" \
        2> "$OUT/baseline.err"; tail -5 "$OUT/baseline.err" ;;
    v2-lite)
      timeout 540 python3 bench/decode.py --workload v2-lite --batch 1,4,16 --steps 12 \
        --baseline > "$OUT/decode_v2lite.jsonl" 2> "$OUT/v2lite.err"; tail -3 "$OUT/v2lite.err" ;;
    cpu-prefetch)  # software prefetch distances and huge pages at decode sizes
      cat /sys/kernel/mm/transparent_hugepage/enabled | tee "$OUT/thp.txt"
      for ahead in 0 512 2048; do
        timeout 120 python3 bench/cpu_moe.py --shape v3 --format int4,int8 --tokens 1,16 \
          --no-naive --prefetch-bytes $ahead >> "$OUT/cpu_moe_prefetch.jsonl"
      done
      timeout 120 python3 bench/cpu_moe.py --shape v3 --format int4,int8 --tokens 1,16 \
        --no-naive --hugepages >> "$OUT/cpu_moe_prefetch.jsonl"
      grep AnonHugePages /proc/meminfo | tee -a "$OUT/thp.txt" ;;
    cpu-sweep)  # int4, int8 on int8 activations: GEMV-all against the GEMM path, 1..1024 tokens
      for q8 in 32 100000; do
        timeout 280 python3 bench/cpu_moe.py --shape v3 --format int4,int8 --tokens 1,16,64,256,1024 \
          --no-naive --gemm-min-tokens-q8 $q8 >> "$OUT/cpu_moe_q8_sweep.jsonl"
      done ;;
    prefill)  # one V3 layer's CPU experts: engine vs streaming through pinned staging
      timeout 200 python3 bench/decode.py --prefill 64,128,256,512,1024,2048 \
        > "$OUT/prefill.jsonl" 2> "$OUT/prefill.err"; tail -3 "$OUT/prefill.err" ;;
    decode-depth)  # batch 1 at 3 and 6 MoE layers: V3 from a MoE layer's marginal cost, all
      # experts on the CPU and with the 80 GB config's 20 GPU experts a layer (~6 min)
      for g in 0 20; do
        for m in 3 6; do
          timeout 200 python3 bench/decode.py --workload v3-slice --moe-layers $m --batch 1 \
            --steps 12 --rounds 2 --defer 2,3,4 --graphs --gpu-experts $g \
            --trace "$OUT/trace_g${g}_depth$m" > "$OUT/decode_g${g}_depth$m.jsonl" \
            2>> "$OUT/decode_depth.err"
        done
        python3 bench/extrapolate.py "$OUT/decode_g${g}_depth3.jsonl" \
          "$OUT/decode_g${g}_depth6.jsonl" | tee "$OUT/decode_g${g}_depths.jsonl"
      done ;;
    decode-gpu-experts)  # batch 1, 6 MoE layers: all experts on the CPU against the 80 GB
      # config's 20 GPU experts a layer (stacked FP8 kernel), in one VM (~3 min)
      for g in 0 20; do
        timeout 150 python3 bench/decode.py --workload v3-slice --moe-layers 6 --batch 1 \
          --steps 12 --rounds 2 --defer 2,3 --graphs --gpu-experts $g \
          > "$OUT/decode_g${g}_depth6.jsonl" 2>> "$OUT/decode_gpu_experts.err"
      done
      tail -3 "$OUT/decode_gpu_experts.err" ;;
    decode-full)  # the whole V3 depth (61 layers), nothing extrapolated: the 80 GB config's 20
      # GPU experts a layer, then all experts on the CPU, batch 1 (~6 min)
      free -g | tee "$OUT/free.txt"
      timeout 300 python3 bench/decode.py --workload v3 --cpu-layers 4 --gpu-experts 20 \
        --batch 1 --steps 12 --rounds 3 --defer 2,3,4 --graphs > "$OUT/decode_v3_g20.jsonl" \
        2> "$OUT/decode_v3_g20.err"; tail -3 "$OUT/decode_v3_g20.err"
      timeout 270 python3 bench/decode.py --workload v3 --cpu-layers 4 --gpu-experts 0 \
        --batch 1 --steps 12 --rounds 3 --defer 2,3,4 --graphs > "$OUT/decode_v3_g0.jsonl" \
        2> "$OUT/decode_v3_g0.err"; tail -3 "$OUT/decode_v3_g0.err" ;;
    decode-full-ab)  # decode-full's two configurations alternated, g0 g20 g0 g20, each its own
      # process in one VM: a VM's CPU side varied 2x from one process to the next (~6 min)
      for run in g0 g20 g0 g20; do
        timeout 135 python3 bench/decode.py --workload v3 --cpu-layers 4 --gpu-experts ${run#g} \
          --batch 1 --steps 12 --rounds 2 --defer 3,4 --graphs --settle-s 40 >> "$OUT/decode_v3_ab.jsonl" \
          2>> "$OUT/decode_v3_ab.err"
      done; grep -c . "$OUT/decode_v3_ab.jsonl" ;;
    decode-threads)  # whole depth, all-CPU, defer3: 15 engine threads and a spinning caller (the
      # default) against 16 threads, the caller spinning or napping; alternated (~7 min)
      for run in 15:5e-3 16:5e-3 16:0 15:5e-3 16:5e-3 16:0; do
        timeout 95 python3 bench/decode.py --workload v3 --cpu-layers 4 --batch 1 --steps 12 \
          --rounds 2 --defer 3 --graphs --settle-s 25 --threads ${run%:*} \
          --caller-spin-s ${run#*:} --caller-nap-s 2e-5 >> "$OUT/decode_v3_threads.jsonl" \
          2>> "$OUT/decode_v3_threads.err"
      done; grep -c . "$OUT/decode_v3_threads.jsonl" ;;
    cpu-decode)  # one V3 layer's CPU experts at decode sizes, with the naive loop (~2 min)
      timeout 240 python3 bench/cpu_moe.py --shape v3 --format int4,int8 --tokens 1,4,16 \
        > "$OUT/cpu_moe_decode.jsonl" 2> "$OUT/cpu_moe_decode.err"; tail -3 "$OUT/cpu_moe_decode.err" ;;
    cpu-amx)  # the AMX GEMM path: its tests on the real tile instructions, then prefill sizes
      # against the naive loop (~4 min)
      (lscpu; grep -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort | uniq -c) > "$OUT/cpu_info.txt" 2>&1
      timeout 200 python3 -m pytest -v tests/test_cpu_amx.py 2>&1 | tee "$OUT/$day-amx-tests.log" \
        | tail -5
      timeout 300 python3 bench/cpu_moe.py --shape v3 --format int4,int4-g128,int8 \
        --tokens 64,256,1024 > "$OUT/cpu_moe_amx.jsonl" 2> "$OUT/cpu_moe_amx.err"
      tail -3 "$OUT/cpu_moe_amx.err"
      for min in 4 8; do  # fewer tokens an expert on the tiles (default 16)
        timeout 100 python3 bench/cpu_moe.py --shape v3 --format int4 --tokens 256,1024 --no-naive \
          --gemm-min-tokens-amx $min >> "$OUT/cpu_moe_amx_min.jsonl" 2>> "$OUT/cpu_moe_amx.err"
      done ;;
    amx-pack-ab)  # the AMX path at prefill sizes, this tree (vectorized activation packing,
      # simd_pack) against base/ (`git archive BASE hetero bench tests/data`), alternated twice
      # in one VM, the naive loop in the first run (~6 min): quantize_x/_h in amx_ms, and the
      # whole call against issue 19's 4x the naive loop at 1024 tokens; then the ablation (~8 min)
      local_naive=""
      for round in 1 2; do
        for side in new base; do
          dir=.; [ "$side" = base ] && dir=base
          (cd "$dir" && timeout 130 python3 bench/cpu_moe.py --shape v3 \
            --format int4,int4-g128,int8 --tokens 1024 $local_naive) 2>> "$OUT/amx_pack_ab.err" \
            | sed "s/^{/{\"side\": \"$side\", \"round\": $round, /" >> "$OUT/amx_pack_ab.jsonl"
          local_naive="--no-naive"
        done
      done; tail -2 "$OUT/amx_pack_ab.err"; grep -c . "$OUT/amx_pack_ab.jsonl"
      # then what bounds this tree's kernels: parts removed, int4 g32/g128 and int8 (~2 min)
      timeout 200 python3 bench/amx_ablate.py > "$OUT/amx_ablate.jsonl" 2> "$OUT/amx_ablate.err"
      tail -1 "$OUT/amx_ablate.err" ;;
    amx-prefetch)  # issue 19: is int8's AMX path (0.46 of the read probe at 1024 tokens) bound
      # by reading its 16 interleaved row streams? the software prefetch distance 0 / 4 KB
      # (default) / 16 KB, and 4 KB on huge pages, int8 and int4-g128 at 1024 tokens (~4 min)
      for ahead in 4096 0 16384; do
        timeout 90 python3 bench/cpu_moe.py --shape v3 --format int8,int4-g128 --tokens 1024 \
          --no-naive --prefetch-bytes $ahead >> "$OUT/amx_prefetch.jsonl" 2>> "$OUT/amx_prefetch.err"
      done
      timeout 90 python3 bench/cpu_moe.py --shape v3 --format int8,int4-g128 --tokens 1024 \
        --no-naive --hugepages >> "$OUT/amx_prefetch.jsonl" 2>> "$OUT/amx_prefetch.err"
      tail -2 "$OUT/amx_prefetch.err"; grep -c . "$OUT/amx_prefetch.jsonl" ;;
    amx-accept)  # issue 19's acceptance point: the three formats at 1024 tokens, each against the
      # naive loop timed first and again right after it (--naive-each: the VMs' speed drifts
      # within a run; 2026-12-05 the naive loop ran at 433-671 ms across calls) (~4 min)
      timeout 300 python3 bench/cpu_moe.py --shape v3 --format int4,int4-g128,int8 --tokens 1024 \
        --naive-each > "$OUT/amx_accept.jsonl" 2> "$OUT/amx_accept.err"; tail -1 "$OUT/amx_accept.err"
      grep -o '"format": "[^"]*"\|"speedup_vs_naive[a-z_]*": [0-9.]*' "$OUT/amx_accept.jsonl" ;;
    amx-schedules)  # issue 19: ns a bf16 tile product under each order of loads and products
      # the bf16 kernel could use (bench/amx_schedules.py), 1 and all threads (~1 min)
      timeout 120 python3 bench/amx_schedules.py > "$OUT/amx_schedules.jsonl" \
        2> "$OUT/amx_schedules.err"; tail -1 "$OUT/amx_schedules.err"; cat "$OUT/amx_schedules.jsonl" ;;
    amx-int8-ab)  # issue 19: the int8 tiles' second token tile on the idle C tiles 6 and 7 (its
      # loads no longer wait on the first's products) against base/ (`git archive 48d172f hetero
      # bench tests/data`: the tree before it), int4-g128 and int8 at 1024 tokens, alternated
      # twice (~4 min)
      local_naive=""
      for round in 1 2; do
        for side in new base; do
          dir=.; [ "$side" = base ] && dir=base
          (cd "$dir" && timeout 110 python3 bench/cpu_moe.py --shape v3 --format int4-g128,int8 \
            --tokens 1024 $local_naive) 2>> "$OUT/amx_int8_ab.err" \
            | sed "s/^{/{\"side\": \"$side\", \"round\": $round, /" >> "$OUT/amx_int8_ab.jsonl"
          local_naive="--no-naive"
        done
      done; tail -2 "$OUT/amx_int8_ab.err"; grep -o '"side": "[a-z]*"\|"format": "[^"]*"\|"ms": [0-9.]*' "$OUT/amx_int8_ab.jsonl" | paste -sd' ' ;;
    amx-slabs)  # issue 19: the bf16 tiles' orders of loads and products (kernels_amx_bf16.ORDERS:
      # 1x4 now, 2x2 two slabs an item, 1x2db two register sets, kb four slabs with k in
      # blocks whose B tiles stay in L1), int4-g32 at 1024 tokens,
      # each once, the naive loop in the first run; then amx_ablate's bf16 runs, the orders
      # interleaved in one process, whole and their tile work alone (~5 min)
      naive=""
      for order in 1x4 2x2 1x2db kb; do
        timeout 100 python3 bench/cpu_moe.py --shape v3 --format int4 --tokens 1024 \
          --amx-bf16-order $order $naive >> "$OUT/amx_slabs.jsonl" 2>> "$OUT/amx_slabs.err"
        naive="--no-naive"
      done
      timeout 240 python3 bench/amx_ablate.py --tiles bf16 > "$OUT/amx_ablate_bf16.jsonl" \
        2>> "$OUT/amx_slabs.err"; tail -1 "$OUT/amx_slabs.err"; cat "$OUT/amx_ablate_bf16.jsonl" ;;
    fi-extend-diag)  # issue 18: flashinfer's extend route (off by default) at the kernel and
      # the model level, each layer's difference printed (~2 min)
      flashinfer_wheels
      timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_flashinfer_mla.py \
        tests/test_flashinfer_extend.py 2>&1 \
        | tee "$OUT/$day-flashinfer-tests.log" | grep -E "layer by layer|passed|failed|^(16|128) " ;;
    amx-layout)  # issue 19: would weights in tile order (each 16-row slab chunk-major, as
      # kt-kernel repacks them) speed up the AMX path? int8, int4-g128 (int8 tiles) and int4-g32
      # (bf16 tiles) at 1024 tokens, the stored rows against a tile-order copy (and for int8,
      # the stored rows copied a row at a time into a per-thread buffer), interleaved, outputs
      # equal (~6 min)
      timeout 450 python3 bench/amx_layout.py > "$OUT/amx_layout.jsonl" 2> "$OUT/amx_layout.err"
      tail -1 "$OUT/amx_layout.err"; cat "$OUT/amx_layout.jsonl" ;;
    fp8-gemm)  # the FP8 decode kernel against dequantize+matmul and bf16 cuBLAS, V3's matrices
      timeout 200 python3 bench/fp8_gemm.py > "$OUT/fp8_gemm.jsonl" 2> "$OUT/fp8_gemm.err"
      tail -3 "$OUT/fp8_gemm.err" ;;
    train-demo)  # ~3 min; the weights come back in parts under the 16 MiB file limit
      timeout 540 python3 tools/train_demo.py --out /tmp/demo 2>&1 | tee "$OUT/train_demo.log" \
        | tail -20 \
        && split -b 15m /tmp/demo/model.safetensors "$OUT/model.safetensors.part." \
        && tar czf "$OUT/demo_meta.tgz" -C /tmp/demo --exclude model.safetensors . ;;
    engine-gpu-tests)  # the gpu tests of the engine's pieces and of the paths it drives (~2 min)
      timeout 150 python3 -m pytest -m gpu -v tests/test_engine_graphs.py tests/test_sampler.py \
        tests/test_graphs.py tests/test_hybrid.py 2>&1 | tee "$OUT/$day-engine-gpu-tests.log" \
        | tail -5 ;;
    serve-v3a)  # the serving engine on the whole V3 depth (int4 experts on the CPU, defer 3):
      # bench/decode.py's batch-1 step alternated with the engine's, 4 rounds, then
      # concurrency 16 (~7 min)
      timeout 450 python3 bench/throughput.py --workload v3 --cpu-layers 4 --concurrency 16 \
        --requests 32 --prompt-len uniform:80,160 --output-len fixed:32 --shared-prefix 64 \
        --warmup 4 --settle-s 30 --ab-rounds 4 --ab-steps 16 --naive 0 \
        > "$OUT/serve_v3_a.jsonl" 2> "$OUT/serve_v3_a.err"; tail -3 "$OUT/serve_v3_a.err" ;;
    serve-v3b)  # concurrency 16 with deferral 3 and 0 (deferring a token's experts splits a layer's
      # job in two, so at a batch an expert can be read twice), then 64 without (~6 min)
      timeout 480 python3 bench/throughput.py --workload v3 --cpu-layers 4 --concurrency 16,16,64 \
        --defer-levels 3,0,0 --requests 16,16,64 --prompt-len uniform:80,160 --output-len fixed:24 \
        --shared-prefix 64 --warmup 4 --settle-s 20 --naive 0 > "$OUT/serve_v3_b.jsonl" \
        2> "$OUT/serve_v3_b.err"; tail -3 "$OUT/serve_v3_b.err" ;;
    serve-v3c)  # deferral 3 (reads shared across a batch) alternated with 0 at concurrency 16
      # and 64, compared in one run (~8 min)
      timeout 560 python3 bench/throughput.py --workload v3 --cpu-layers 4 \
        --concurrency 16,16,16,16,64,64 --defer-levels 3,0,3,0,3,0 --requests 16,16,16,16,64,64 \
        --prompt-len uniform:80,160 --output-len fixed:16 --shared-prefix 64 --warmup 4 \
        --settle-s 20 --naive 0 > "$OUT/serve_v3_c.jsonl" 2> "$OUT/serve_v3_c.err"
      tail -3 "$OUT/serve_v3_c.err" ;;
    serve-http)  # the HTTP layer's cost: hetero serve's app vs the engine handle, alternated,
      # on V2-Lite (c1, c16) then the whole V3 depth (c1, c16) (~8 min). The GPU image lacks
      # fastapi/uvicorn/pydantic: carry them as wheels (.whl, see the device README) and start
      # the call with their pip install --target /tmp/site and PYTHONPATH
      timeout 150 python3 bench/serving_http.py --workload v2-lite --concurrency 1,16 \
        --requests 4,32 --prompt-len uniform:64,256 --output-len fixed:32 --warmup 8 \
        --shared-prefix 64 --naive 0 > "$OUT/serve_http_v2lite.jsonl" 2> "$OUT/serve_http_v2lite.err"
      tail -2 "$OUT/serve_http_v2lite.err"
      timeout 330 python3 bench/serving_http.py --workload v3 --cpu-layers 4 --concurrency 1,16 \
        --requests 2,16 --prompt-len uniform:80,160 --output-len fixed:12 --warmup 4 \
        --shared-prefix 64 --naive 0 > "$OUT/serve_http_v3.jsonl" 2> "$OUT/serve_http_v3.err"
      tail -2 "$OUT/serve_http_v3.err" ;;
    serve-v2lite)  # the whole V2-Lite shape, then the deterministic mode's cost (~5 min)
      timeout 200 python3 bench/throughput.py --workload v2-lite --concurrency 1,4,16,64 \
        --requests 4,8,32,64 --prompt-len uniform:64,256 --output-len fixed:64 --warmup 8 \
        --settle-s 5 --naive 1 --shared-prefix 64 > "$OUT/serve_v2lite.jsonl" \
        2> "$OUT/serve_v2lite.err"; tail -3 "$OUT/serve_v2lite.err"
      timeout 100 python3 bench/throughput.py --workload v2-lite --concurrency 4,16 \
        --requests 8,32 --prompt-len uniform:64,256 --output-len fixed:64 --warmup 8 \
        --settle-s 5 --naive 0 --shared-prefix 64 --deterministic \
        > "$OUT/serve_v2lite_det.jsonl" 2> "$OUT/serve_v2lite_det.err"
      tail -3 "$OUT/serve_v2lite_det.err" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
if [ "${PACK:-0}" = 1 ]; then
  tar czf /tmp/results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/results.tgz "$OUT/"
fi
