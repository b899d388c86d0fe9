#!/usr/bin/env bash
# The GPU measurements still owed by issue #5, prepared for one short device session (an H100 or
# H200 with the workplace's 'cuda' image: JAX with its CUDA plugin, pytest; nothing downloaded).
# Each part fits one 10-minute call; results land in $OUT (or ./gpu_out).
#
#   bash benchmarks/gpu_session.sh check   # ~4 min: the Pallas decode kernels compiled for the GPU
#                                          # against XLA (tests/test_gpu_kernels.py), then float32
#                                          # greedy codes, XLA's ops vs the kernels, batch 1
#   bash benchmarks/gpu_session.sh speed   # ~6 min: bfloat16 batch 1 and 8, 100 frames, XLA's
#                                          # ops vs the kernels at three tile settings
#
# Missing packages (soundfile, soxr, ...) travel as wheels in .whl/ (see the device notes); the
# full-size random checkpoint is built once into /tmp/ckpt on the machine.
set -uo pipefail
part=${1:?usage: gpu_session.sh check|speed}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

bench() {  # bench NAME ARGS...: bench_scale over the 0.6B random checkpoint, no official
    local name=$1; shift
    python3 benchmarks/bench_scale.py --size 0b6 --official-batches '' --folder /tmp/ckpt \
        --results "$OUT/RESULTS.md" --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
}

case $part in
check)
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 \
        | tee "$OUT/kernel_tests.log"
    bench f32_codes --dtype f32 --batches 1 --frames 30 --variants default,pallas \
        --variant-batches 1 --timeout 300
    ;;
speed)
    bench speed --batches 1,8 --frames 100 --variants default,pallas,pallas-n32,pallas-w8 \
        --variant-batches 1,8 --timeout 300
    ;;
*)
    echo "unknown part $part: check or speed" >&2; exit 2 ;;
esac
