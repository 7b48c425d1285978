#!/usr/bin/env bash
# One device call: environment facts, the GPU test suite, first timings. Logs land in $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import jax, flax, optax, chex; print(jax.__version__, flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/env.txt"
for step in "$@"; do
  echo "=== $step"
  case "$step" in
    tests) timeout 300 python3 -m pytest -q -x tests/test_attention.py tests/test_masking.py 2>&1 | tail -25 | tee "$OUT/tests.txt" ;;
    vtests) timeout 240 python3 -m pytest -v -p no:cacheprovider tests/test_attention.py 2>&1 | while IFS= read -r l; do echo "$(date +%T) $l"; done | tee "$OUT/vtests.txt" | grep -E "PASS|FAIL|ERROR|passed|failed" ;;
    decode) timeout 150 python3 -m pytest -q -m gpu tests/test_decode.py 2>&1 | tail -15 | tee "$OUT/decode_tests.txt"
            timeout 240 python3 -m benchmarks.decode --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode_log.txt" | tail -40 ;;
    suite) XD=""; python3 -c "import xdist" 2>/dev/null && XD="-n 4"
           XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 330 python3 -m pytest -q -p no:cacheprovider $XD -rf --durations=10 tests 2>&1 | tail -40 | tee "$OUT/suite.txt" ;;
    gpt2) timeout 150 python3 benchmarks/gpt2_step.py --out "$OUT/gpt2_step.json" 2>&1 | grep -v "^W1\|^E1" | tail -20 ;;
    sweep_short) timeout 140 python3 -m benchmarks.tune --shape 4,4096,16,128 --causal no --sweep --out "$OUT/sweep_nc.json" | grep -E "best|TFLOP" | sort -t' ' -k1,1 | tail -60 ;;
    attention) timeout 380 python3 -m benchmarks.attention --out-dir "$OUT" --time-limit 330 2>&1 | grep -v "^W1\|^E1" | tail -60 ;;
    models) XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 -m pytest -q -p no:cacheprovider -n 4 -rf tests/test_flax.py tests/test_gpt2.py tests/test_attention.py 2>&1 | tail -12 | tee "$OUT/models.txt" ;;
    attention2) timeout 430 python3 -m benchmarks.attention --out-dir "$OUT" --name attention_part2 --time-limit 380 --quick \
                --shapes 4x4096x16x64,4x4096x8x256,32x512x16x128,4x4096x32x8x128,16x1024x16x64,1x16384x16x64 2>&1 | grep -v "^W1\|^E1" | tail -40 ;;
    sweep_hd) timeout 250 python3 -m benchmarks.tune --shape 4,4096,8,256 --causal no --sweep --out "$OUT/sweep_hd256.json" | grep best
              timeout 250 python3 -m benchmarks.tune --shape 4,4096,16,64 --causal no --sweep --out "$OUT/sweep_hd64.json" | grep best ;;
    segments) timeout 150 python3 -m benchmarks.segments 2>&1 | grep -v "^W1\|^E1" | tail -25 | tee "$OUT/segments.txt" ;;
    attention3) timeout 300 python3 -m benchmarks.attention --out-dir "$OUT" --name attention_part3 --time-limit 250 --quick \
                --shapes 4x4096x16x64,4x4096x8x256,16x1024x16x64,1x16384x16x64 2>&1 | grep -v "^W1\|^E1" | tail -20 ;;
    sweep64_long) timeout 200 python3 -m benchmarks.tune --shape 1,16384,16,64 --causal both --passes fwdbwd --sweep --out "$OUT/sweep_hd64_16k.json" | grep best ;;
    final) XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 170 python3 -m pytest -q -p no:cacheprovider -n 4 -rf tests 2>&1 | tail -4 | tee "$OUT/suite.txt"
           timeout 410 python3 -m benchmarks.attention --out-dir "$OUT" --quick --shapes default --time-limit 390 2>&1 | grep -v "^W1\|^E1" | tee "$OUT/attention_log.txt" | tail -8 ;;
    gputests) timeout 300 python3 -m pytest -q -m gpu tests 2>&1 | tail -25 | tee "$OUT/gputests.txt" ;;
    base) timeout 240 python3 -m benchmarks.tune --shape 4,4096,16,128 --baselines --out "$OUT/base.json" ;;
    long) timeout 200 python3 -m benchmarks.tune --shape 1,16384,16,128 --baselines --out "$OUT/long.json" ;;
    sweep_nc) timeout 420 python3 -m benchmarks.tune --shape 4,4096,16,128 --causal no --sweep --out "$OUT/sweep_nc.json" ;;
    sweep_c) timeout 420 python3 -m benchmarks.tune --shape 4,4096,16,128 --causal yes --sweep --out "$OUT/sweep_c.json" ;;
    mosaic_base) for shp in 4,4096,16,128 4,4096,16,64 4,4096,8,256; do
                   timeout 200 python3 -m benchmarks.tune --impl mosaic --shape $shp --causal both --baselines \
                     --out "$OUT/mosaic_base_${shp//,/x}.json" 2>&1 | grep -E "TFLOP|Error|error" | tail -20; done ;;
    mosaic_quick) for shp in ${QUICK_SHAPES:-4,4096,16,128 4,4096,16,64}; do
                    timeout 200 python3 -m benchmarks.tune --impl mosaic --shape $shp --causal both --baselines \
                      --baseline-impls cudnn --out "$OUT/mosaic_quick_${shp//,/x}.json" 2>&1 | grep -E "TFLOP|Error|error" | tail -20; done ;;
    mosaic_tests) XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python3 -m pytest -q -p no:cacheprovider -rf \
                  tests/test_mosaic.py 2>&1 | tail -30 | tee "$OUT/mosaic_tests.txt" ;;
    mosaic_sweep) for shp in ${SWEEP_SHAPES:-4,4096,16,128}; do
                    timeout ${SWEEP_TIMEOUT:-200} python3 -m benchmarks.tune --impl mosaic --shape $shp --causal no --sweep \
                      --passes ${SWEEP_PASSES:-fwd,fwdbwd} --out "$OUT/mosaic_sweep_${shp//,/x}.json" 2>&1 | grep -E "best" | tail -40; done ;;
    mosaic_configs) for shp in ${CONFIG_SHAPES:-4,4096,16,128}; do
                      hd=${shp##*,}; var=CONFIGS_$hd; configs=${!var:-"[{}]"}
                      timeout ${CONFIG_TIMEOUT:-200} python3 -m benchmarks.tune --impl mosaic --shape $shp --causal both \
                        --baselines --baseline-impls cudnn --passes ${CONFIG_PASSES:-fwd} --configs "$configs" \
                        --out "$OUT/mosaic_configs_${shp//,/x}.json" 2>&1 | grep -E "TFLOP|Error|error" | tail -30; done ;;
    *) echo "unknown step $step" ;;
  esac
done
