"""Generation speed at batch 1 .. 128 on whatever JAX backend is present (CPU, GPU, TPU): ours and
the official qwen-tts side by side in one run, full-size random weights.

    python benchmarks/bench_scale.py --size 0b6 --batches 1,8,32 --frames 100          # this CPU
    python benchmarks/bench_scale.py --size 0b6 --batches 1,8,32,64,128 --frames 200 \\
        --variants default,cmdbuf,cudnn --official-batches 1,8                          # a GPU

Steps (each implementation in its own subprocess, so peak memory is its own):
  build     a random-weight CustomVoice checkpoint in the official layout at the released sizes
            (benchmarks/full_configs.py), written with numpy (no torch needed): normal(0, 0.02)
            matrices, unit norms. The EOS row of the codec head is zero, so that no row stops early
            and every batch generates exactly FRAMES frames (greedy or sampled).
  ours      per variant (default; cmdbuf = XLA GPU command buffers for while loops and conditionals
            too; cudnn = cuDNN attention; rows-as-given = batch 1 as one row on a GPU too, where
            the API pads it to two; topk-dispatch = the sampler's top-k path as on the CPU):
            batches padded to the API's buckets (the extra rows stop at
            once and are not counted); load in DTYPE, then per batch size a cold generate and
            codec decode (compilation included), then two warm runs of both. Time to first audio
            (TTFA) at batch 1 is the streaming path's first chunk: prefill, FIRST frames, the
            streaming codec's (`StreamDecoder`, as the API streams) decode of those frames (all
            compiled, warm, median of 5).
  official  qwen-tts 0.1.1 `Qwen3TTSForConditionalGeneration.generate` on the same checkpoint and
            device (bf16 on GPU like ours unless --dtype f32; float32 on CPU), at --official-batches.

Reported per batch, side by side (each figure says what it counts; frames/s summed over the rows):
  codes frames/s         token ids -> codes, prefill included, no codec (best warm generate);
  whole frames/s         token ids -> codes -> 24 kHz samples, the codec decode of every row
                         included (best warm generate + decode; ours only: the official's
                         `generate` stops at codes);
  TTFA ms                streaming time to first audio at batch 1 (see above);
and the codes' x-real-time (seconds of audio per second, 12.5 frames per audio second), warm
seconds, compile (cold - warm) seconds, peak device memory.
The bandwidth limit: at batch 1 a frame reads the talker layers + codec head once and the code
predictor's layers + one lm_head 15 times; those bytes over the measured device-copy bandwidth
(read + write of a large array, in the same run) give the ideal frames/s, and each implementation's
batch-1 frames/s is stated as a fraction of it.

Every prompt is token ids ("<|im_start|>assistant\\n" + 24 random text ids + the chat tail),
speaker ryan, English, non-streaming text mode; batch rows differ in their text ids.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FRAME_RATE = 12.5
SAMPLE_RATE = 24000
HEAD = [151644, 77091, 198]
TAIL = [151645, 198, 151644, 77091, 198]
TEXT_TOKENS = 24
LANGUAGE, SPEAKER = "english", "ryan"
DEFAULTS = {"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 1.0,
            "repetition_penalty": 1.05, "subtalker_dosample": True, "subtalker_temperature": 0.9,
            "subtalker_top_k": 50, "subtalker_top_p": 1.0, "max_new_tokens": 8192}
# Variants of ours: XLA flags (GPU only), and `options` fields set over the backend's defaults
# (`Options.for_backend`): attention backend, predictor steps unrolled or a loop, sampler choices.
CMDBUF = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,"
          "CONDITIONAL")
VARIANTS = {
    "default": dict(),
    "cmdbuf": dict(env={"XLA_FLAGS": CMDBUF}),
    "nocmdbuf": dict(env={"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}),
    # cuBLAS for every product instead of XLA's Triton GEMMs (few-row products on a GPU)
    "cublas": dict(env={"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}),
    # the sampler's k-th largest logit by `lax.top_k` (a sort on GPUs) instead of the
    # accelerators' default pairwise counts (Options.kth_by)
    "kth-top-k": dict(options=dict(kth_by="top_k")),
    # the Triton GEMM autotuner tries every tiling (few-row products are ~50 % of bandwidth)
    "exhaustive": dict(env={"XLA_FLAGS": "--xla_gpu_exhaustive_tiling_search=true"}),
    "cudnn": dict(options=dict(attention="cudnn")),
    "loop": dict(options=dict(unroll_predictor=False)),
    "unrolled": dict(options=dict(unroll_predictor=True)),
    # CPU: XLA's products and attention instead of cpu_kernels.py
    "xla-products": dict(options=dict(cpu_kernels=False)),
    # batches as given, without the backend's fewest rows (Options.min_rows: 2 on a GPU)
    "rows-as-given": dict(options=dict(min_rows=1)),
    # the sampler's run-time top-k path (the CPU default) on any backend
    "topk-dispatch": dict(options=dict(runtime_dispatch=True)),
    # one general sampler program for any settings (no `SamplingParams.kind` specialization;
    # the CPU's default)
    "general-sampler": dict(options=dict(specialize_sampler=False)),
    "general-sampler-cmdbuf": dict(options=dict(specialize_sampler=False),
                                   env={"XLA_FLAGS": CMDBUF}),
    # int8 weights for the decoder products (quantize.py; not the official codes)
    "int8": dict(quantize="int8"),
    # int8 weights with float32 activations (the int8 kernel before the integer dot products)
    "int8-float": dict(quantize="int8", options=dict(int8_activations="float")),
    # the code predictor's steps as Pallas (Triton) kernels, two a decoder layer
    # (Options.predictor_kernels; NVIDIA GPUs, up to 16 rows), at the default tiles and two others
    # (k chunk, intermediate columns per program, output columns per atomic add, warps, stages)
    "pallas": dict(options=dict(predictor_kernels="pallas")),
    "pallas-k128": dict(options=dict(predictor_kernels="pallas",
                                     predictor_tiles=(128, 32, 128, 4, 2, 0))),
    "pallas-f64": dict(options=dict(predictor_kernels="pallas",
                                    predictor_tiles=(64, 64, 128, 8, 3, 0))),
    # the attention block as two kernels (H + 2 KV programs, then H x 8), three a layer
    "pallas-split": dict(options=dict(predictor_kernels="pallas",
                                      predictor_tiles=(64, 32, 128, 4, 3, 8))),
    # the kernels with int8 weights (against the variant "int8": XLA's int8 products)
    "pallas-int8": dict(quantize="int8", options=dict(predictor_kernels="pallas")),
    # the same kernels through Pallas' interpreter (the CPU rehearsal of gpu_session.sh kernels)
    "pallas-interpret": dict(options=dict(predictor_kernels="interpret", cache_layout="positions",
                                          cpu_kernels=False)),
    "pallas-int8-interpret": dict(quantize="int8", options=dict(
        predictor_kernels="interpret", cache_layout="positions", cpu_kernels=False)),
    "pallas-split-interpret": dict(options=dict(
        predictor_kernels="interpret", cache_layout="positions", cpu_kernels=False,
        predictor_tiles=(64, 32, 128, 4, 3, 2))),
    # the talker's frame steps through the same kernels too (Options.talker_kernels; up to 16
    # rows): every decoder step of the frame two kernels a layer, or three (split)
    "tpallas": dict(options=dict(predictor_kernels="pallas", talker_kernels="pallas")),
    "tpallas-split": dict(options=dict(predictor_kernels="pallas", talker_kernels="pallas",
                                       predictor_tiles=(64, 32, 128, 4, 3, 8),
                                       talker_tiles=(64, 32, 128, 4, 3, 8))),
    # and with each head's attention over 4 shares of the cache (slot parts: flash decoding)
    "tpallas-parts": dict(options=dict(predictor_kernels="pallas", talker_kernels="pallas",
                                       predictor_tiles=(64, 32, 128, 4, 3, 8),
                                       talker_tiles=(64, 32, 128, 4, 3, 8, 4))),
    # every step's kernels with XLA's command buffers (CUDA graphs) for the frame loop's while
    # loop and conditionals too, and with none (direction 4 of issue 26: one graph a frame loop,
    # re-measured on the kernels; XLA's default captures fusions and custom calls, not loops)
    "tpallas-cmdbuf": dict(options=dict(predictor_kernels="pallas", talker_kernels="pallas"),
                           env={"XLA_FLAGS": CMDBUF}),
    "tpallas-nocmdbuf": dict(options=dict(predictor_kernels="pallas", talker_kernels="pallas"),
                             env={"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}),
    # the talker's kernels alone (the predictor on XLA's ops)
    "tpallas-only": dict(options=dict(talker_kernels="pallas")),
    "tpallas-int8": dict(quantize="int8", options=dict(predictor_kernels="pallas",
                                                       talker_kernels="pallas")),
    "tpallas-interpret": dict(options=dict(
        predictor_kernels="interpret", talker_kernels="interpret", cache_layout="positions",
        cpu_kernels=False)),
    "tpallas-split-interpret": dict(options=dict(
        predictor_kernels="interpret", talker_kernels="interpret", cache_layout="positions",
        cpu_kernels=False, predictor_tiles=(64, 32, 128, 4, 3, 2),
        talker_tiles=(64, 32, 128, 4, 3, 2))),
    "tpallas-parts-interpret": dict(options=dict(
        predictor_kernels="interpret", talker_kernels="interpret", cache_layout="positions",
        cpu_kernels=False, predictor_tiles=(64, 32, 128, 4, 3, 2),
        talker_tiles=(64, 32, 128, 4, 3, 2, 4))),
    "tpallas-cmdbuf-interpret": dict(options=dict(
        predictor_kernels="interpret", talker_kernels="interpret", cache_layout="positions",
        cpu_kernels=False), env={"XLA_FLAGS": CMDBUF}),
    "tpallas-only-interpret": dict(options=dict(
        talker_kernels="interpret", cache_layout="positions", cpu_kernels=False)),
    "tpallas-int8-interpret": dict(quantize="int8", options=dict(
        predictor_kernels="interpret", talker_kernels="interpret", cache_layout="positions",
        cpu_kernels=False)),
}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def prompt_ids(row: int) -> list[int]:
    text = np.random.default_rng(1 + row).integers(1000, 50000, TEXT_TOKENS).tolist()
    return HEAD + text + TAIL


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------

def build(args) -> dict:
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from full_configs import codec as codec_config
    from full_configs import tts_config_kwargs
    from safetensors.numpy import save_file

    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.codec import decoder as codec_decoder
    from qwen3_tts_jax.codec.config import parse_config as parse_codec_config
    from qwen3_tts_jax.config import parse_config

    config = dict(model_type="qwen3_tts", architectures=["Qwen3TTSForConditionalGeneration"],
                  **tts_config_kwargs(args.size, "custom_voice"))
    os.makedirs(os.path.join(args.folder, "speech_tokenizer"), exist_ok=True)
    with open(os.path.join(args.folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.folder, "generation_config.json"), "w") as f:
        json.dump(DEFAULTS, f, indent=2)
    cfg = parse_config(config)
    rng = np.random.default_rng(0)
    tensors, n = {}, 0
    for key, shape in checkpoint.expected_shapes(cfg).items():
        if len(shape) == 1:
            a = np.ones(shape, np.float32) if key.endswith("norm.weight") else \
                np.zeros(shape, np.float32)
        else:
            a = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        if key == "talker.codec_head.weight":
            a[cfg.talker.codec_eos_token_id] = 0.0
        tensors[key] = a
        n += a.size
    save_file(tensors, os.path.join(args.folder, "model.safetensors"))
    codec = dict(model_type="qwen3_tts_tokenizer_12hz", **codec_config(args.size))
    with open(os.path.join(args.folder, "speech_tokenizer", "config.json"), "w") as f:
        json.dump(codec, f, indent=2)
    dec = {}  # an audible random codec, like qwen3_tts_jax/demo.py
    for key, shape in codec_decoder.expected_shapes(parse_codec_config(codec).decoder).items():
        if key.endswith("cluster_usage"):
            a = np.ones(shape, np.float32)
        elif key.endswith("embedding_sum"):
            a = rng.standard_normal(shape, np.float32)
        elif key.endswith((".alpha", ".beta")):
            a = rng.standard_normal(shape, np.float32) * np.float32(0.1)
        elif key.endswith(("norm.weight", "scale", "gamma")):
            a = np.ones(shape, np.float32) if "norm" in key else np.full(shape, 0.01, np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) or 1
            a = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(fan_in))
        dec[key] = a
    save_file(dec, os.path.join(args.folder, "speech_tokenizer", "model.safetensors"))
    return {"params_m": n / 1e6}


# ------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------

def device_bandwidth(jax, jnp) -> float:
    """Bytes/s of a device copy (read + write) of a 1 GiB array, best of 10 (on the CPU: a numpy
    copy split over every CPU, which XLA:CPU's elementwise loops do not reach)."""
    if jax.devices()[0].platform == "cpu":
        sys.path.insert(0, HERE)
        from bench_generate import copy_bandwidth
        return copy_bandwidth(len(os.sched_getaffinity(0)))
    x = jnp.ones((2**28,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def weight_bytes_per_frame(jax, params) -> dict:
    size = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    tp, cp = params["talker"], params["code_predictor"]  # packed or not: the same bytes
    talker = size(tp["layers"]) + size(tp["norm"]) + size(tp["codec_head"])
    step = (size(cp["layers"]) + size(cp["norm"]) + size(cp["lm_head"][0])
            + size(cp.get("mtp_proj", {})))
    steps = cp["lm_head"].shape[0]
    return {"talker": talker, "predictor_step": step, "predictor_steps": steps,
            "total": talker + steps * step}


def profile_summary(folder: str, frames: int) -> dict:
    """Device kernels of a `jax.profiler.trace` folder: per device stream line, the number of
    kernels and their summed time per frame, the span they cover (busy vs idle), and the kernels
    that take the most time (name: count per frame, microseconds per frame)."""
    import glob

    from jax.profiler import ProfileData

    out = {}
    for path in glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                events = [e for e in line.events if e.duration_ns > 0]
                if not events:
                    continue
                busy = sum(e.duration_ns for e in events)
                span = max(e.end_ns for e in events) - min(e.start_ns for e in events)
                names: dict = {}
                for e in events:
                    n, t = names.get(e.name, (0, 0.0))
                    names[e.name] = (n + 1, t + e.duration_ns)
                top = sorted(names.items(), key=lambda kv: -kv[1][1])[:25]
                out[f"{plane.name} | {line.name}"] = {
                    "kernels_per_frame": len(events) / frames,
                    "busy_us_per_frame": busy / frames / 1e3,
                    "span_us_per_frame": span / frames / 1e3,
                    "distinct": len(names),
                    "top": {k[:90]: [round(n / frames, 2), round(t / frames / 1e3, 1)]
                            for k, (n, t) in top}}
    return out


def run_ours(args) -> dict:
    variant = VARIANTS[args.variant]
    env = variant.get("env", {})
    import jax
    import jax.numpy as jnp

    if args.dtype == "f32":
        jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, ROOT)
    from qwen3_tts_jax import checkpoint, prompts, sampling
    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.buckets import batch_rows, ladder
    from qwen3_tts_jax.codec.tokenizer import SpeechTokenizer
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.options import Options

    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32, None: None}[args.dtype]
    options = Options.for_backend(dtype=dtype or checkpoint.default_dtype(),
                                  **variant.get("options", {}))
    log(f"ours[{args.variant}]: {options}")
    dev = jax.devices()[0]
    t0 = time.perf_counter()
    cfg = load_config(args.folder)
    params = checkpoint.load_params(args.folder, cfg, dtype)
    params_m = sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6
    # what Qwen3TTS.from_pretrained does
    params = checkpoint.pack_for_inference(params, consume=True, quantize=variant.get("quantize"),
                                           options=options)
    params = jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    codec = SpeechTokenizer.from_pretrained(os.path.join(args.folder, "speech_tokenizer"))
    compiling = {"s": 0.0}
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiling.__setitem__("s", compiling["s"] + duration)
        if event in COMPILE_EVENTS else None)

    def rows(B):  # the API's padded batch (one row is two on a GPU; extra rows stop at once)
        return batch_rows(B, options.min_rows)

    def settings(B, do_sample, frames):
        def sp(prefix):
            return sampling.SamplingParams.create(
                rows(B), do_sample=do_sample, temperature=DEFAULTS[prefix + "temperature"],
                top_k=DEFAULTS[prefix + "top_k"], top_p=DEFAULTS[prefix + "top_p"],
                options=options)
        budget = np.array([frames + 1] * B + [1] * (rows(B) - B), np.int32)
        return gen.Settings(sp(""), sp("subtalker_"),
                            jnp.full((rows(B),), DEFAULTS["repetition_penalty"], jnp.float32),
                            jnp.asarray(budget))

    def make_batch(B):
        items = [prompts.build_prompt(cfg, prompt_ids(b), LANGUAGE, SPEAKER, None,
                                      non_streaming_mode=True) for b in range(rows(B))]
        # the prompt buckets `Qwen3TTS` uses (api.py: the 16, 24, 32, 48, ... ladder)
        batch = prompts.batch_prompts(cfg, items, length=ladder(len(items[0])),
                                      trailing_length=ladder(len(items[0].trailing)))
        keys = jnp.stack([jax.random.PRNGKey(b) for b in range(rows(B))])
        return batch, keys

    def timed_generate(batch, s, keys, frames):
        t = time.perf_counter()
        state = gen.generate(params, cfg, batch, s, keys, max_frames=frames, options=options)
        codes = np.asarray(state.codes_BxFxG)
        lengths = np.asarray(state.length_B)
        return codes, lengths, time.perf_counter() - t

    def timed_decode(codes, lengths):
        """The API's `decode` of every row's codes (offline chunking): the 24 kHz samples."""
        t = time.perf_counter()
        wavs, _ = codec.decode([codes[b, :int(n)] for b, n in enumerate(lengths)])
        return wavs, time.perf_counter() - t

    def timed_prefill(batch, s, keys, frames):
        t = time.perf_counter()
        state, _ = gen.prefill(params, cfg, batch, s, keys, frames=gen.capacity(frames, options),
                               compute=gen.prefill_length(batch.mask_BxL), options=options)
        jax.block_until_ready(state.token_B)
        return time.perf_counter() - t

    def memory():
        stats = dev.memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**30

    dtype_name = str(jnp.dtype(params["talker"]["codec_embedding"].dtype))
    from qwen3_tts_jax import decode_kernels   # say whether the kernels take these calls
    for part, p_, c_, mode, tiles in (
            ("predictor", params["code_predictor"], cfg.talker.code_predictor,
             options.predictor_kernels, options.predictor_tiles),
            ("talker", params["talker"], cfg.talker, options.talker_kernels, options.talker_tiles)):
        if mode == "xla":
            continue
        for B in args.batches:
            why = decode_kernels.why_not(p_["layers"], c_, rows(B), jnp.dtype(dtype_name),
                                         options.cache_layout, tiles)
            log(f"ours[{args.variant}] B={B}: {part} kernels "
                + (f"not used: {why}" if why else
                   f"used, tiles {decode_kernels.tiles(c_, tiles)}"))
    if variant.get("quantize"):
        dtype_name += f" + {variant['quantize']} weights"
    out = {"jax": jax.__version__, "device": str(dev.device_kind), "platform": dev.platform,
           "variant": args.variant, "dtype": dtype_name,
           "load_s": load_s, "params_m": params_m, "batches": {},
           "xla_flags": env.get("XLA_FLAGS", "")}
    out["bandwidth"] = device_bandwidth(jax, jnp)
    out["weight_bytes"] = weight_bytes_per_frame(jax, params)
    modes = ["greedy", "sampled"] if args.sampled else ["greedy"]
    for B in args.batches:
        try:
            batch, keys = make_batch(B)
            row = {}
            for mode in modes:
                s = settings(B, mode == "sampled", args.frames)
                before = compiling["s"]
                codes, lengths, cold = timed_generate(batch, s, keys, args.frames)
                lengths = lengths[:B]                     # the requests' rows, not the padding
                frames = int(lengths.sum())
                whole = {}
                try:   # the whole utterance: the same codes through the codec, cold then warm
                    wavs, codec_cold = timed_decode(codes, lengths)
                    whole = {"codec_cold_s": codec_cold,
                             "audio_s": sum(len(w) for w in wavs) / SAMPLE_RATE}
                except Exception as e:  # noqa: BLE001 - a batch the codec cannot hold
                    whole = {"whole_error": f"{type(e).__name__}: {str(e)[:300]}"}
                gen_s, dec_s = [], []
                for _ in range(2):
                    c, n, g = timed_generate(batch, s, keys, args.frames)
                    gen_s.append(g)
                    if "audio_s" in whole:
                        dec_s.append(timed_decode(c, n[:B])[1])
                warm = min(gen_s)
                if dec_s:
                    both = min(g + d for g, d in zip(gen_s, dec_s))
                    whole.update(decode_s=min(dec_s), whole_s=both,
                                 whole_frames_per_s=frames / both,
                                 whole_xrt=frames / FRAME_RATE / both)
                row[mode] = {"cold_s": cold, "warm_s": warm, "compile_s": cold - warm,
                             "xla_compile_s": compiling["s"] - before, "frames": frames,
                             "min_len": int(lengths.min()), "frames_per_s": frames / warm,
                             "xrt": frames / FRAME_RATE / warm, **whole}
                if B == 1 and mode == "greedy":
                    out["codes_b1"] = codes[0, :int(lengths[0])].tolist()
                if B == 1 and mode == "greedy" and not args.quick:
                    # the prefill alone (what `generate` runs before the frame loop), warm
                    row[mode]["prefill_s"] = min(timed_prefill(batch, s, keys, args.frames)
                                                 for _ in range(3))
                log(f"ours[{args.variant}] B={B} {mode}: codes {frames / warm:.1f} frames/s, "
                    f"whole utterance {whole.get('whole_frames_per_s', float('nan')):.1f} "
                    f"frames/s, xRT (codes) {frames / FRAME_RATE / warm:.1f}, warm {warm:.2f} s, "
                    f"cold {cold:.1f} s")
            row["peak_device_gb"] = memory()
            if args.profile and B == 1:
                for mode in modes:
                    where = os.path.join(args.profile, f"{args.variant}-{mode}")
                    with jax.profiler.trace(where):
                        timed_generate(batch, settings(B, mode == "sampled", args.frames), keys,
                                       args.frames)
                    row[mode]["profile"] = summary = profile_summary(where, row[mode]["frames"])
                    log(f"ours[{args.variant}] B=1 {mode} profile: "
                        + json.dumps(summary, indent=1)[:4000])
            out["batches"][str(B)] = row
            with open(args.out, "w") as f:  # partial results survive a timeout
                json.dump(out, f)
        except Exception as e:  # noqa: BLE001 - a size that does not fit is a result too
            log(f"ours[{args.variant}] B={B}: {type(e).__name__}: {e}"[:500])
            out["batches"][str(B)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            break
    out["peak_rss_gb"] = peak_rss_gb()
    # Time to first audio: the streaming path's first chunk, warm.
    try:
        batch, keys = make_batch(1)
        s = settings(1, True, args.frames)
        capacity = gen.capacity(args.frames, options)
        stream_codec = codec.stream_decoder()   # the streaming API's codec (runner.stream)

        def first_audio(frames):
            t = time.perf_counter()
            state, ctx = gen.prefill(params, cfg, batch, s, keys, frames=capacity,
                                     options=options)
            state = gen.decode(params, cfg, state, ctx, s, frames, options)
            n = int(state.length_B[0])
            stream_codec.reset(0)
            wav = stream_codec.push([np.asarray(state.codes_BxFxG[0, :n])])[0]
            return time.perf_counter() - t, len(wav)

        # the first chunk as asked, and as one frame (the least a stream can start with)
        out["ttfa_by_frames"] = {}
        for frames in sorted({args.first_chunk, 1}, reverse=True):
            first_audio(frames)
            ttfa = sorted(first_audio(frames)[0] for _ in range(5))
            out["ttfa_by_frames"][str(frames)] = ttfa[len(ttfa) // 2]
            log(f"ours[{args.variant}] TTFA, {frames}-frame first chunk: {1000 * ttfa[2]:.1f} ms")
        out["ttfa_s"] = out["ttfa_by_frames"][str(args.first_chunk)]
    except Exception as e:  # noqa: BLE001
        out["ttfa_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if args.quick:
        return out
    try:  # the codec program's scratch memory, as XLA plans it (first chunk's window)
        from qwen3_tts_jax.codec import decoder
        from qwen3_tts_jax.codec.tokenizer import frame_bucket
        window = jnp.zeros((1, frame_bucket(args.first_chunk), 16), jnp.int32)
        m = decoder.jit_decode.lower(codec.params, codec.config.decoder, window).compile() \
            .memory_analysis()
        out["codec_temp_gib"] = m.temp_size_in_bytes / 2**30
        log(f"codec decode of {window.shape[1]} frames: temp {out['codec_temp_gib']:.2f} GiB")
    except Exception as e:  # noqa: BLE001
        out["codec_temp_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# ------------------------------------------------------------------------------------------------
# official
# ------------------------------------------------------------------------------------------------

def run_official(args) -> dict:
    import torch
    from qwen_tts.core.models import Qwen3TTSForConditionalGeneration as Model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if (cuda and args.dtype != "f32") else torch.float32
    t0 = time.perf_counter()
    model = super(Model, Model).from_pretrained(args.folder, dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - t0
    sampling = {k: DEFAULTS[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty",
                                         "subtalker_temperature", "subtalker_top_k",
                                         "subtalker_top_p")}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def generate(B, frames, do_sample):
        ids = [torch.tensor([prompt_ids(b)], device=device) for b in range(B)]
        torch.manual_seed(0)
        sync()
        t = time.perf_counter()
        codes, _ = model.generate(input_ids=ids, languages=[LANGUAGE] * B, speakers=[SPEAKER] * B,
                                  non_streaming_mode=True, max_new_tokens=frames + 1,
                                  do_sample=do_sample, subtalker_dosample=do_sample, **sampling)
        sync()
        return codes, time.perf_counter() - t

    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "dtype": str(dtype), "load_s": load_s, "batches": {}}
    if not cuda:
        torch.set_num_threads(os.cpu_count())
    for B in args.batches:
        row = {}
        try:
            for mode in (["greedy", "sampled"] if args.sampled else ["greedy"]):
                codes, cold = generate(B, args.frames, mode == "sampled")
                codes, warm = generate(B, args.frames, mode == "sampled")
                frames = sum(len(c) for c in codes)
                row[mode] = {"cold_s": cold, "warm_s": warm, "frames": frames,
                             "frames_per_s": frames / warm, "xrt": frames / FRAME_RATE / warm}
                if B == 1 and mode == "greedy":
                    out["codes_b1"] = codes[0].cpu().numpy().tolist()
                log(f"official B={B} {mode}: {frames / warm:.1f} frames/s, warm {warm:.2f} s")
            if cuda:
                row["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
            out["batches"][str(B)] = row
        except Exception as e:  # noqa: BLE001
            log(f"official B={B}: {type(e).__name__}: {e}"[:500])
            out["batches"][str(B)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            break
    if args.ttfa:
        try:
            generate(1, args.first_chunk, True)
            out["first_frames_s"] = sorted(generate(1, args.first_chunk, True)[1]
                                           for _ in range(3))[1]
        except Exception as e:  # noqa: BLE001
            out["ttfa_error"] = str(e)[:300]
    out["peak_rss_gb"] = peak_rss_gb()
    return out


ROLES = {"build": build, "ours": run_ours, "official": run_official}


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------

def child(role: str, args, extra: list[str], env: dict | None = None, timeout=None) -> dict:
    out = os.path.join(args.workdir, f"{role}-{len(os.listdir(args.workdir))}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--folder", args.folder,
           "--out", out, "--size", args.size, "--frames", str(args.frames),
           "--first-chunk", str(args.first_chunk)] + extra
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.sampled:
        cmd += ["--sampled"]
    if args.profile:
        cmd += ["--profile", args.profile]
    t = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log(f"{role} {extra}: FAILED ({e})")
        if os.path.exists(out):  # what it measured before it stopped
            with open(out) as f:
                return json.load(f) | {"error": str(e)[:300]}
        return {"error": str(e)[:300]}
    log(f"{role} {extra}: {time.perf_counter() - t:.0f} s")
    with open(out) as f:
        return json.load(f)


def machine() -> str:
    """The accelerator (nvidia-smi; the parent must not initialise JAX, which would hold device
    memory while the children run) or the CPU model."""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        if gpu:
            return f"{gpu.splitlines()[0]}, host {os.cpu_count()} CPUs"
    except (OSError, subprocess.SubprocessError):
        pass
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} CPUs"


def report(args, built, ours: dict, official: dict | None, loads) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    first = next((r for r in ours.values() if "batches" in r), None)
    params_m = built.get("params_m") or (first or {}).get("params_m", 0)
    lines = [f"## Batch sweep, {args.size} CustomVoice, {machine()} ({now})", "",
             f"`python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}`: "
             f"{'tiny-shape (not a figure)' if args.size == 'tiny' else 'full-size'} random "
             f"weights ({params_m:.0f}M params), {args.frames} frames per row, "
             f"{TEXT_TOKENS} text tokens, non-streaming text, speaker {SPEAKER}. Load average "
             f"{'/'.join(f'{x:.2f}' for x in loads[0])} at start, "
             f"{'/'.join(f'{x:.2f}' for x in loads[1])} at end.", ""]
    if first:
        lines.append(f"Ours: JAX {first['jax']}, {first['dtype']}. "
                     + (f"Official: torch {official['torch']}, {official['dtype']}."
                        if official and "torch" in official else "Official: not run."))
        lines.append("")
    rows = ["| implementation | batch | mode | codes frames/s (token ids to codes, prefill "
            "incl., no codec) | whole utterance frames/s (token ids to 24 kHz samples, codec "
            "incl.) | TTFA ms (streaming first audio, batch 1, warm) | codes x-real-time "
            "| codes warm s | codes compile s | peak device GiB | ours/official (codes) |",
            "|" + " --- |" * 11]
    ref = (official or {}).get("batches", {})
    for name, res in list(ours.items()) + ([("official", official)] if official else []):
        if "batches" not in res:
            rows.append(f"| {name} | - | - | failed: {res.get('error', '')[:80]} |"
                        + " |" * 7)
            continue
        ttfa = res.get("ttfa_s")
        for B, row in res["batches"].items():
            if "error" in row:
                rows.append(f"| {name} | {B} | - | {row['error'][:80]} |" + " |" * 7)
                continue
            for mode in ("greedy", "sampled"):
                if mode not in row:
                    continue
                m = row[mode]
                base = ref.get(B, {}).get(mode)
                ratio = (f"{m['frames_per_s'] / base['frames_per_s']:.1f}x"
                         if base and name != "official" else "")
                whole = (f"{m['whole_frames_per_s']:.1f}" if "whole_frames_per_s" in m else
                         "- (codes only)" if name == "official" else
                         f"failed: {m.get('whole_error', '')[:60]}")
                ttfa_cell = ""
                if B == "1" and ttfa is not None:   # one figure, on the first batch-1 row
                    ttfa_cell, ttfa = f"{1000 * ttfa:.0f}", None
                rows.append(f"| {name} | {B} | {mode} | {m['frames_per_s']:.1f} | {whole} "
                            f"| {ttfa_cell} | {m['xrt']:.1f} | {m['warm_s']:.2f} "
                            f"| {m.get('compile_s', 0):.1f} "
                            f"| {row.get('peak_device_gb', 0):.1f} | {ratio} |")
    lines += rows + [""]
    for name, res in ours.items():
        if "batches" not in res:
            continue
        wb, bw = res["weight_bytes"], res["bandwidth"]
        ideal = bw / wb["total"]
        b1 = res["batches"].get("1", {}).get("greedy")
        if b1:
            lines.append(f"- {name}: batch-1 bandwidth limit: {wb['total'] / 1e9:.2f} GB of "
                         f"weights per frame over {bw / 1e9:.0f} GB/s measured device copy = "
                         f"{ideal:.0f} frames/s ({ideal / FRAME_RATE:.0f}x real time); greedy "
                         f"batch 1 reaches {b1['frames_per_s'] / ideal:.0%} of it.")
        if b1 and "prefill_s" in b1:
            loop = b1["frames"] / (b1["warm_s"] - b1["prefill_s"])
            lines.append(f"- {name}: of the batch-1 greedy request, the prefill takes "
                         f"{1000 * b1['prefill_s']:.1f} ms; the frame loop alone runs {loop:.1f} "
                         f"frames/s ({loop / FRAME_RATE:.1f}x real time; the table counts the "
                         "whole request).")
        if "ttfa_s" in res:
            one = (res.get("ttfa_by_frames") or {}).get("1") if args.first_chunk != 1 else None
            lines.append(f"- {name}: TTFA = prefill + {args.first_chunk} frames (sampled) + the "
                         f"streaming codec's decode of those frames, warm, median of 5: "
                         f"{1000 * res['ttfa_s']:.0f} ms"
                         + (f" (a 1-frame first chunk: {1000 * one:.0f} ms)." if one else "."))
        if b1 and "decode_s" in b1:
            lines.append(f"- {name}: of the batch-1 greedy whole utterance "
                         f"({b1['audio_s']:.2f} s of audio), the codec decode takes "
                         f"{b1['decode_s']:.2f} s (codec compile "
                         f"{b1['codec_cold_s'] - b1['decode_s']:.1f} s).")
        lines.append(f"- {name}: load {res['load_s']:.1f} s, peak host RSS "
                     f"{res['peak_rss_gb']:.1f} GB"
                     f"{', XLA_FLAGS ' + res['xla_flags'] if res['xla_flags'] else ''}.")
    from bench_generate import first_difference
    for name, res in list(ours.items())[1:]:  # each variant against the first, same dtype
        if first and "codes_b1" in first and "codes_b1" in res:
            diff = first_difference(res["codes_b1"], first["codes_b1"], (name, list(ours)[0]))
            lines.append(f"- Greedy codes at batch 1, {name} vs {list(ours)[0]} ({res['dtype']}): "
                         f"{'identical' if diff is None else diff}.")
    if official and "codes_b1" in official and first and "codes_b1" in first:
        diff = first_difference(first["codes_b1"], official["codes_b1"])
        lines.append(f"- Greedy codes at batch 1, ours vs official ({first['dtype']}): "
                     f"{'identical' if diff is None else diff}.")
    if official and "first_frames_s" in official:
        lines.append(f"- official: prompt + {args.first_chunk} frames (no codec): "
                     f"{1000 * official['first_frames_s']:.0f} ms.")
    lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="0b6", choices=["tiny", "0b6", "1b7"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--official-batches", default=None,
                    help="batch sizes for the official (default: the same; '' to skip it)")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--first-chunk", type=int, default=3, help="frames in the first audio chunk")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default=None,
                    help="default: bf16 on accelerators, f32 on CPU (ours); the official follows")
    ap.add_argument("--sampled", action="store_true", help="also the sampled settings")
    ap.add_argument("--variants", default="default",
                    help=f"comma-separated, of {sorted(VARIANTS)}; the first runs every batch size, "
                         "the others --variant-batches")
    ap.add_argument("--variant-batches", default="1")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per child")
    ap.add_argument("--profile", default=None,
                    help="folder: also trace one warm batch-1 generate per mode per variant "
                         "(jax.profiler) and summarize its device kernels")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--json", default=None, help="also write every figure here")
    ap.add_argument("--folder", default=None, help="reuse (or build once into) this checkpoint")
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--ttfa", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # no prefill, codec
    args = ap.parse_args()
    if args.role:
        args.batches = [int(b) for b in args.batches.split(",") if b]
        res = ROLES[args.role](args)
        with open(args.out, "w") as f:
            json.dump(res, f)
        return

    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as workdir:
        args.workdir = workdir
        folder = args.folder or os.path.join(workdir, "checkpoint")
        args.folder = folder
        built = {}
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            built = child("build", args, [])
        ours = {}
        half = args.timeout / 2 if args.timeout else None
        for i, v in enumerate(args.variants.split(",")):
            env = VARIANTS[v].get("env", {})
            batches = args.batches if i == 0 else args.variant_batches
            # the variants after the first: no prefill figure, no codec memory analysis
            ours[f"ours[{v}]"] = child("ours", args, ["--variant", v, "--batches", batches]
                                       + ([] if i == 0 else ["--quick"]),
                                       env, args.timeout if i == 0 else half)
        official = None
        ob = args.batches if args.official_batches is None else args.official_batches
        if ob:
            official = child("official", args, ["--batches", ob, "--ttfa"], None, half)
    loads.append(os.getloadavg())
    section = report(args, built, ours, official, loads)
    print(section)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ours": ours, "official": official, "built": built}, f)
    if args.results:
        from bench_generate import append_results
        append_results(args.results, section)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
