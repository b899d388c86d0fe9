"""In-process A/B of the codec decoder in float32 and in bf16 (`codec_precision="bf16"`: the
convolutions on AVX-512 BF16, kernels/cpu_kernels.cc `ConvBf16`), on this CPU, batch 1.

    python benchmarks/ab_codec_bf16.py --kernels [--frames 40] [--repeats 5]
    python benchmarks/ab_codec_bf16.py [--folder /tmp/ckpt0b6/speech_tokenizer] [--frames 40]
                                       [--chunk 4] [--repeats 5] [--codes-from /tmp/ckpt0b6]

--kernels: every convolution shape of the full-size decoder for --frames frames (derived from the
released config), XLA's float32 convolution against the bf16 kernel, alternating call by call:
median ms, GFLOP/s and the ratio, per shape and weighted by how often the decoder runs it.

Default: `decode` of --frames frames (offline) and `stream_decode` pushed --chunk frames at a
time, float32 against bf16, alternating; median wall seconds and the median of pair ratios; the
SNR of the bf16 audio against float32's (dB), of the waveform and of the last conv's output before
the clamp to [-1, 1]. Codes: generated greedily by the checkpoint at --codes-from (int4 weights;
the random-weight checkpoint's own codes), else uniform random. --parity: instead of --folder, the
released decoder sizes with tests/test_codec_decoder.py `build_parity_codec` weights, scaled so
that the audio peaks near 0.9 (a random checkpoint's codec output is mostly clipped at +-1).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen3_tts_jax import cpu_kernels  # noqa: E402
from qwen3_tts_jax.codec import decoder as D  # noqa: E402
from qwen3_tts_jax.codec.config import DecoderConfig  # noqa: E402


def conv_shapes(cfg: DecoderConfig, frames: int):
    """(name, count, T, C, N, k, dilation) of the decoder's convolutions for `frames` frames (the
    transposed ones in their polyphase form); count: how many run at that shape."""
    T = frames
    out = [("pre_conv", 1, T, cfg.codebook_dim, cfg.latent_dim, 3, 1)]
    for r in cfg.upsampling_ratios:
        out.append((f"upsample x{r}", 1, T, cfg.latent_dim, r * cfg.latent_dim, 1, 1))
        T *= r
    out.append(("decoder.0", 1, T, cfg.latent_dim, cfg.decoder_dim, 7, 1))
    for i, r in enumerate(cfg.upsample_rates):
        cin, cout = cfg.decoder_dim // 2 ** i, cfg.decoder_dim // 2 ** (i + 1)
        out.append((f"block{i + 1} trans x{r}", 1, T, cin, r * cout, 2, 1))
        T *= r
        for d in D.RESIDUAL_DILATIONS:
            out.append((f"block{i + 1} k7 d{d}", 1, T, cout, cout, 7, d))
        out.append((f"block{i + 1} k1", 3, T, cout, cout, 1, 1))
    return out


def bench_kernels(args):
    cfg = DecoderConfig(codebook_dim=512, head_dim=64, hidden_size=512, intermediate_size=1024)
    rng = np.random.default_rng(0)
    rows, tot32, tot16 = [], 0.0, 0.0
    for name, count, T, C, N, k, d in conv_shapes(cfg, args.frames):
        x = jnp.asarray(rng.standard_normal((1, T, C), np.float32))
        w = (rng.standard_normal((k, C, N)) / np.sqrt(k * C)).astype(np.float32)
        pw = cpu_kernels.pack_conv_bf16(w)
        w = jnp.asarray(w)
        f32 = jax.jit(lambda x, w, d=d, k=k: jax.lax.conv_general_dilated(
            x, w, (1,), [((k - 1) * d, 0)], rhs_dilation=(d,),
            dimension_numbers=("NWC", "WIO", "NWC")))
        f16 = jax.jit(lambda x, w, d=d: cpu_kernels.conv_bf16(x, w, d))
        y32, y16 = f32(x, w), f16(x, pw)
        rel = float(jnp.abs(y32 - y16).max() / jnp.abs(y32).max())
        t32, t16 = [], []
        for _ in range(args.repeats):
            for fn, a, ts in ((f32, w, t32), (f16, pw, t16)):
                t = time.perf_counter()
                fn(x, a).block_until_ready()
                ts.append(time.perf_counter() - t)
        gflop = 2 * T * C * N * k / 1e9
        m32, m16 = np.median(t32), np.median(t16)
        tot32 += count * m32
        tot16 += count * m16
        rows.append(f"| {name} x{count} | {T} | {C}->{N} k{k} d{d} | {gflop:.2f} | "
                    f"{1e3 * m32:.1f} ({gflop / m32:.0f}) | {1e3 * m16:.1f} ({gflop / m16:.0f}) | "
                    f"{m32 / m16:.2f}x | {rel:.1e} |")
    print(f"{args.frames} frames, batch 1; ms (GFLOP/s), medians of {args.repeats} alternating")
    print("| conv | T | shape | GFLOP | XLA float32 | bf16 kernel | ratio | max diff / peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"all convolutions: float32 {tot32:.3f} s, bf16 {tot16:.3f} s, {tot32 / tot16:.2f}x")


def model_codes(folder: str, frames: int) -> np.ndarray:
    from qwen3_tts_jax import Qwen3TTS

    tts = Qwen3TTS.from_pretrained(folder, quantize="int4")
    codes = tts.generate_custom_voice_codes(
        "Hello there, this is a short sentence for the whole utterance.", speaker="ryan",
        language="english", do_sample=False, subtalker_dosample=False,
        max_new_tokens=frames + 1)
    return np.asarray(codes[0])[:frames]


def bench_decode(args):
    from qwen3_tts_jax.codec import SpeechTokenizer

    folder = args.folder
    if args.parity:
        import tempfile

        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from test_codec_decoder import FULL_DECODER, build_parity_codec

        folder = os.path.join(tempfile.mkdtemp(), "codec")
        build_parity_codec(folder, FULL_DECODER, frames=args.frames)
    toks = {p: SpeechTokenizer.from_pretrained(folder, precision=p)
            for p in ("float32", "bf16")}
    cfg = toks["float32"].config.decoder
    if args.codes_from:
        codes = model_codes(args.codes_from, args.frames)
        source = f"greedy codes of {args.codes_from} (int4)"
    else:
        codes = np.random.default_rng(0).integers(0, cfg.codebook_size,
                                                  (args.frames, cfg.num_quantizers))
        source = "uniform random codes"
    codes = jnp.asarray(codes[None].astype(np.int32))

    def offline(params):
        f = jax.jit(lambda p, c: D.decode(p, cfg, c))
        return lambda: f(params, codes)

    def streaming(params):
        f = jax.jit(lambda p, s, c, n, r: D.stream_decode(p, cfg, s, c, n, r))

        def run():
            state, out = D.init_stream_state(params, cfg, 1), []
            for i in range(0, args.frames, args.chunk):
                c = codes[:, i:i + args.chunk]
                w, state = f(params, state, c, jnp.full((1,), c.shape[1], jnp.int32),
                             jnp.zeros((1,), bool))
                out.append(w)
            return jnp.concatenate(out, 1)
        return run

    runs = {(mode, p): make(toks[p].params) for mode, make in
            (("offline", offline), ("streaming", streaming)) for p in toks}
    def snr(w, ref):
        return 10 * np.log10(np.sum(ref ** 2) / max(np.sum((w - ref) ** 2), 1e-300))

    waves = {k: np.asarray(fn(), np.float64) for k, fn in runs.items()}
    ref = waves["offline", "float32"]
    last = f"decoder.{len(cfg.upsample_rates) + 2}"
    stage = jax.jit(lambda p, c: D.decode_stages(p, cfg, c)[last][..., 0])
    raw = {p: np.asarray(stage(toks[p].params, codes), np.float64) for p in toks}
    for k, w in waves.items():
        print(f"{k[0]:9s} {k[1]:7s}: SNR vs float32 offline {snr(w, ref):.1f} dB (rms "
              f"{np.sqrt(np.mean(w ** 2)):.3g}, clipped {np.mean(np.abs(w) >= 1):.1%})")
    print(f"before the clamp: bf16 SNR vs float32 {snr(raw['bf16'], raw['float32']):.1f} dB "
          f"(peak {np.abs(raw['float32']).max():.3g})")
    load = os.getloadavg()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit}, load average "
          f"{load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{'parity codec' if args.parity else folder}, {source}, "
          f"{args.frames} frames, streaming in chunks of {args.chunk}, {args.repeats} runs")
    for mode in ("offline", "streaming"):
        a, b = np.array(times[mode, "float32"]), np.array(times[mode, "bf16"])
        print(f"{mode:9s} float32 {np.median(a):.3f} s | bf16 {np.median(b):.3f} s | speed-up "
              f"{np.median(a / b):.2f}x (pairs: {', '.join(f'{x:.2f}' for x in a / b)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--folder", default="/tmp/ckpt0b6/speech_tokenizer")
    ap.add_argument("--codes-from", default=None)
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cpu_kernels.check_bf16_conv()
    bench_kernels(args) if args.kernels else bench_decode(args)


if __name__ == "__main__":
    main()
