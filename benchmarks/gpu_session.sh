#!/usr/bin/env bash
# The GPU measurements, prepared for one short device call (an H100 or H200
# with the workplace's 'cuda' image: JAX with its CUDA plugin, pytest; nothing downloaded). Results
# land in $OUT (or ./gpu_out): gpu.txt, all.log, RESULTS.md (sections to paste into
# benchmarks/RESULTS.md) and one JSON per part.
#
#   bash benchmarks/gpu_session.sh one       # ~9 min, by priority: the 0.6B at batch 1 (greedy, as
#                                            # the API runs it: two rows on a GPU) against the
#                                            # predictor's steps as a loop (accelerators unroll
#                                            # them); sampled, against the k-th logit by
#                                            # lax.top_k (accelerators use pairwise counts);
#                                            # then batch 8, 64, 128 with both; the 1.7B at 1 and
#                                            # 64; the streaming codec, stateful vs windowed
#   bash benchmarks/gpu_session.sh profile   # ~2 min: batch 1 greedy and sampled with a kernel
#                                            # profile of the frame (profile.json)
#   bash benchmarks/gpu_session.sh server    # ~8-9 min: the server (1.7B CustomVoice) under
#                                            # open-loop Poisson load, 10, 20 and 40 requests/s
#                                            # for 60 s each (bench_server --poisson: TTFA
#                                            # percentiles, client and server side (GET
#                                            # /metrics), underruns; server.json).
#                                            # SERVER_ARGS="--admit-frames 1
#                                            # --first-chunk-frames 1 --chunk-ramp": the
#                                            # server set for first audio (another call)
#   bash benchmarks/gpu_session.sh quant     # ~6-8 min: int8 weights for the decoder products
#                                            # (quantize="int8": XLA's products, the int8 -> bf16
#                                            # convert fused) against bf16, the 0.6B at 1, 8, 64
#                                            # and the 1.7B at 1, 64; then int8's and bf16's
#                                            # closeness to float32 (bench_quantize: logits error,
#                                            # top-1 agreement, first divergent frame)
#   bash benchmarks/gpu_session.sh overlap   # ~3-4 min: a streamed chunk's codec beside the next
#                                            # chunk's frames (Options.codec_overlap "queue":
#                                            # dispatched before them) against "off", the 0.6B,
#                                            # the streaming API (1 then 12 / 4 frames) and the
#                                            # engine with 8 requests (overlap.txt)
#   bash benchmarks/gpu_session.sh icl       # ~3-4 min: a cloned voice's time to first audio
#                                            # against a preset speaker, per-voice caches off /
#                                            # cold / warm; the streaming API's (icl.txt)
#   bash benchmarks/gpu_session.sh decide    # ~6-8 min, the FIRST call of a device session: do the
#                                            # Pallas decode kernels pay? Their step tests compiled
#                                            # (predictor's and talker's: decide_tests.txt); whole
#                                            # frames of the 0.6B at batch 1, greedy and sampled:
#                                            # XLA, predictor kernels, every step's (fused, split)
#                                            # (decide.json); the talker's step alone, 2 rows over
#                                            # 64 and 1024 slots, fused and 4 slot parts
#                                            # (talker_decide.json). Then `kernels`/`kernels3` to
#                                            # tune what paid
#   bash benchmarks/gpu_session.sh kernels   # ~7-9 min: the code predictor's Pallas kernels
#                                            # (Options.predictor_kernels): their tests as
#                                            # compiled on the GPU (kernels_tests.txt); the
#                                            # predictor alone at 2 and 16 rows, XLA against six
#                                            # kernel tilings (bench_decode_kernels.py,
#                                            # predictor.json); then whole frames, the 0.6B at
#                                            # batch 1 (greedy, sampled), 8 and 16: XLA, two
#                                            # kernels a layer, three (the attention split)
#   bash benchmarks/gpu_session.sh kernels2  # ~6-8 min: the predictor alone with int8 weights;
#                                            # whole frames with int8 weights, kernels against
#                                            # XLA's int8 products (0.6B, 1 and 16); the 1.7B at 1
#   bash benchmarks/gpu_session.sh kernels3  # ~7-9 min: the talker's frame steps through the same
#                                            # kernels (Options.talker_kernels): their tests
#                                            # compiled (kernels3_tests.txt); the talker's step
#                                            # alone at 2 and 16 rows over 64, 512 and 2048 cache
#                                            # slots, with 1, 4 and 16 slot parts (talker.json);
#                                            # whole frames, the 0.6B at 1 (greedy, sampled): XLA,
#                                            # predictor kernels, every step's (fused, split, slot
#                                            # parts); the 1.7B at 1
#   bash benchmarks/gpu_session.sh graphs    # ~5-6 min: the frame loop with every step's kernels
#                                            # under XLA's command buffers as by default, with
#                                            # the while loop captured too, and with none; XLA's
#                                            # ops with and without loops captured (gr06.json;
#                                            # batch 1 and 16, the 0.6B)
#
#   SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh PART
#                                            # here, before a device call: the part's every
#                                            # command on the CPU with tiny shapes (1-5 min)
#
# Missing packages travel as wheels in .whl/ (git-ignored through .git/info/exclude; carry it):
# the image has JAX 0.11 and most of the rest, not soundfile, soxr, cffi or pycparser (nor, perhaps,
# prometheus-client: without it the server runs and its /metrics columns are n/a). Made here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     soundfile==0.14.0 soxr==1.1.0 cffi==2.0.0 pycparser prometheus-client
# The full-size random checkpoints are built once into /tmp/ckpt and /tmp/ckpt17 on the machine
# (/tmp/ckpt17srv for `server`: the 1.7B shapes with the demo's tokenizer and preset voices).
{   # read whole before it runs: an edit of this file meanwhile does not change a running part
set -uoE pipefail
fail=0
trap 'fail=1' ERR   # a failing command does not stop the part (the next may still measure), but
                    # the part exits non-zero
part=${1:?usage: [SMOKE=1] gpu_session.sh one|profile|server|quant|overlap|icl|decide|kernels|kernels2|kernels3|graphs}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${SMOKE:-}" ]; then
    # A rehearsal on this machine's CPU before a device call: every command of the part on tiny
    # shapes (benchmarks/full_configs.py "tiny"), 6 frames, batches of 1-2, short loads; a few
    # minutes a part, and a failing command shows here instead of on the device. Not figures.
    export JAX_PLATFORMS=cpu
    T=${SMOKE_DIR:-/tmp/gpu_smoke} S06=tiny S17=tiny   # T: where the checkpoints are built
    PK=pallas-interpret PKS=pallas-interpret,pallas-split-interpret
    PKQ=int8,pallas-int8-interpret   # the predictor kernels: interpreted
    TK=tpallas-interpret TKS=tpallas-interpret,tpallas-split-interpret,tpallas-parts-interpret
    SP=2   # the o split (the tiny widths: 64 / 2 columns a block)
    TKD=tpallas-interpret,tpallas-split-interpret
    TKG=tpallas-cmdbuf-interpret   # XLA_FLAGS for a GPU's command buffers: no effect here
    B() { echo 1,2; }; N() { echo "$2"; }   # batch list; N FULL SMOKE: a count
else
    export JAX_PLATFORMS=cuda
    T=/tmp S06=0b6 S17=1b7
    PK=pallas PKS=pallas,pallas-split PKQ=int8,pallas-int8
    TK=tpallas TKS=tpallas,tpallas-split,tpallas-parts SP=8 TKD=tpallas,tpallas-split
    TKG=tpallas-cmdbuf,tpallas-nocmdbuf
    B() { echo "$1"; }; N() { echo "$1"; }
fi
mkdir -p "$T"
if [ -z "${SMOKE:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
PY=${PYTHON:-python3}

bench() {  # bench NAME SIZE FOLDER ARGS...: bench_scale over a random checkpoint, no official
    local name=$1 size=$2 folder=$3; shift 3
    $PY benchmarks/bench_scale.py --size "$size" --official-batches '' --folder "$folder" \
        --results "$OUT/RESULTS.md" --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$OUT/all.log"
}

case $part in
one)
    bench b1 $S06 $T/ckpt --batches 1 --frames $(N 100 6) --timeout 200 --sampled \
        --variants default,loop,kth-top-k --variant-batches 1
    bench sweep $S06 $T/ckpt --batches $(B 8,64,128) --frames $(N 100 6) --timeout 240 \
        --variants default,loop --variant-batches $(B 8,64,128)
    bench 1b7 $S17 $T/ckpt17 --batches $(B 1,64) --frames $(N 100 6) --timeout 200
    # the streaming codec (stateful vs windowed re-decode) on the 0.6B checkpoint's codec
    timeout 150 $PY benchmarks/bench_stream_decode.py --codec $T/ckpt/speech_tokenizer \
        --frames $(N 200 8) --batch $(B "1 8 64" | tr , ' ') --results "$OUT/RESULTS.md" \
        2>&1 | tee -a "$OUT/all.log"
    ;;
profile)
    # greedy and sampled at batch 1 with a kernel profile (profile.json: kernels per frame,
    # busy time, the costliest kernels)
    bench b1 $S06 $T/ckpt --batches 1 --frames $(N 100 6) --timeout 240 --sampled \
        --profile "$OUT/prof" --variants default --variant-batches 1
    $PY - "$OUT" <<'PY'   # the kernel summaries in one small file that comes back
import glob, json, sys
out = {p: json.load(open(p)) for p in glob.glob(sys.argv[1] + "/*.json")}
prof = {f"{v}:{B}:{m}": r[m]["profile"] for p, j in out.items()
        for v, res in (j.get("ours") or {}).items()
        for B, r in res.get("batches", {}).items() for m in ("greedy", "sampled")
        if isinstance(r, dict) and "profile" in r.get(m, {})}
json.dump(prof, open(sys.argv[1] + "/profile.json", "w"), indent=1)
PY
    rm -rf "$OUT/prof"
    ;;
server)
    # builds the checkpoint if missing (~1-2 min), compiles in the warm-up (a few minutes), then
    # 3 x (60 s of arrivals + the last requests' end; a request past 30 s is a timeout). Stopped
    # at 560 s it reports the rates done; run it again on the warm machine to finish: the
    # checkpoint and the compiled programs (~/.cache/qwen3-tts-jax/xla) are kept there
    timeout 560 $PY benchmarks/bench_server.py --size $S17 --folder $T/ckpt17srv \
        --poisson $(N "10 20 40" 2) --duration $(N 60 5) ${SERVER_ARGS:-} \
        --results "$OUT/RESULTS.md" --json "$OUT/server.json" 2>&1 | tee -a "$OUT/all.log"
    ;;
quant)
    bench q06 $S06 $T/ckpt --batches $(B 1,8,64) --frames $(N 100 6) --timeout 240 \
        --variants default,int8 --variant-batches $(B 1,8,64)
    bench q17 $S17 $T/ckpt17 --batches $(B 1,64) --frames $(N 100 6) --timeout 200 \
        --variants default,int8 --variant-batches $(B 1,64)
    timeout 120 $PY benchmarks/bench_quantize.py --folder $T/ckpt --size $S06 --rows $(N 8 2) \
        --frames $(N 50 6) --results "$OUT/RESULTS.md" 2>&1 | tee -a "$OUT/all.log"
    ;;
overlap)
    timeout 400 $PY benchmarks/ab_codec_overlap.py --folder $T/ckpt06srv --build $S06 \
        --modes off,queue,thread --rounds $(N 5 1) --frames $(N 100 6) --engine-rows $(N 8 2) \
        --results "$OUT/RESULTS.md" 2>&1 | tee -a "$OUT/all.log" | tee "$OUT/overlap.txt"
    ;;
icl)
    # a cloned voice (ICL, 5 s of reference) against a preset speaker through the engine, with
    # its per-voice caches (prompt-prefix KV, codec state) off, cold and warm; the streaming API's
    # time to first audio in both text modes (bench_ttfa.py; the 1.7B shapes, ~3-4 min)
    timeout 400 $PY benchmarks/bench_ttfa.py --folder $T/ckpt17srv --build $S17 --runs $(N 5 1) \
        2>&1 | tee -a "$OUT/all.log" | tee "$OUT/icl.txt"
    ;;
decide)
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py \
        -k "stack_step or split_attention or talker_step" 2>&1 | tee -a "$OUT/all.log" | tee "$OUT/decide_tests.txt"
    bench decide $S06 $T/ckpt --batches 1 --frames $(N 100 6) --timeout 300 --sampled \
        --variants default,$PK,$TKD --variant-batches 1
    timeout 120 $PY benchmarks/bench_decode_kernels.py --part talker --size $S06 --batches 2 \
        --context $(N 64,1024 20) --frames $(N 50 2) --variants xla,pallas,pallas:64,32,128,4,3,$SP,4 \
        --results "$OUT/RESULTS.md" --json "$OUT/talker_decide.json" 2>&1 | tee -a "$OUT/all.log"
    ;;
kernels)
    # first whether the compiled kernels compute what XLA does (the interpreter checks them on
    # the CPU; the atomic adds and masks only run for real here), then their speed
    timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py \
        -k "stack or split_attention or lower" 2>&1 | tee -a "$OUT/all.log" | tee "$OUT/kernels_tests.txt"
    # tilings (k, f, n, warps, stages, o split) on the predictor alone: a compile is seconds
    timeout 240 $PY benchmarks/bench_decode_kernels.py --size $S06 --batches $(B 2,16) --frames $(N 50 3) \
        --variants xla,pallas,pallas:64,32,128,4,3,8,pallas:64,32,128,4,3,4,pallas:128,32,128,4,2,0,pallas:64,64,128,8,3,0 \
        --results "$OUT/RESULTS.md" --json "$OUT/predictor.json" 2>&1 | tee -a "$OUT/all.log"
    bench pk06 $S06 $T/ckpt --batches 1 --frames $(N 100 6) --timeout 300 --sampled \
        --variants default,$PKS --variant-batches $(B 1,8,16)
    ;;
kernels2)
    timeout 150 $PY benchmarks/bench_decode_kernels.py --size $S06 --batches $(B 2,16) --frames $(N 50 3) \
        --quantize int8 --variants xla,pallas,pallas:64,32,128,4,3,8 \
        --results "$OUT/RESULTS.md" --json "$OUT/predictor_int8.json" 2>&1 | tee -a "$OUT/all.log"
    bench pk06q $S06 $T/ckpt --batches 1 --frames $(N 100 6) --timeout 240 \
        --variants $PKQ --variant-batches $(B 1,16)
    bench pk17 $S17 $T/ckpt17 --batches 1 --frames $(N 100 6) --timeout 200 \
        --variants default,$PK --variant-batches 1
    ;;
graphs)
    # direction 4 re-measured on the kernels: the frame loop with every step's kernels under
    # XLA's default command buffers (CUDA graphs of fusions and custom calls), with the while
    # loop and conditionals captured too, and with none; XLA's ops both ways for reference
    bench gr06 $S06 $T/ckpt --batches $(B 1,16) --frames $(N 100 6) --timeout 300 \
        --variants default,cmdbuf,$TK,$TKG --variant-batches $(B 1,16)
    ;;
kernels3)
    # the talker's frame steps through the kernels too (Options.talker_kernels): their tests
    # compiled (a cache of the batch's rows, masked; left-padded rows), the talker's step alone
    # at three cache fills, then whole frames: predictor kernels alone against every step's
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py \
        -k "talker_step or talker_kernels_lower" 2>&1 | tee -a "$OUT/all.log" | tee "$OUT/kernels3_tests.txt"
    timeout 200 $PY benchmarks/bench_decode_kernels.py --part talker --size $S06 --batches $(B 2,16) \
        --context $(N 64,512,2048 20) --frames $(N 50 2) \
        --variants xla,pallas,pallas:64,32,128,4,3,$SP,4,pallas:64,32,128,4,3,$SP,16 \
        --results "$OUT/RESULTS.md" --json "$OUT/talker.json" 2>&1 | tee -a "$OUT/all.log"
    bench tk06 $S06 $T/ckpt --batches 1 --frames $(N 100 6) --timeout 240 --sampled \
        --variants default,$PK,$TKS --variant-batches 1
    bench tk17 $S17 $T/ckpt17 --batches 1 --frames $(N 100 6) --timeout 120 \
        --variants default,$TK --variant-batches 1
    ;;
*)
    echo "unknown part $part: one, profile, server, quant, overlap, icl, decide, kernels, kernels2, kernels3 or graphs" >&2
    exit 2 ;;
esac
exit $fail
}
