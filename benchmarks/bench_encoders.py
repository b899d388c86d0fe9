"""Full-size encoders on this CPU: ours (JAX) and the official qwen-tts (PyTorch) side by side in one
run, random weights, float32, batch 1.

    python benchmarks/bench_encoders.py [--codec-seconds 4 10] [--spk-seconds 3 10] [--repeats 2]

Codec (Mimi) encoder: the official `Qwen3TTSTokenizerV2Model` with the released sizes
(benchmarks/full_configs.py CODEC), built by tests/official.py `build_codec` (torch seed 0,
`randomize_codec_` codebooks / SnakeBeta, audible decoder), then tests/test_codec_encoder.py
`randomize_encoder_` (codebook rows scaled to the quantizer input so the chosen codes vary from frame
to frame; with N(0, 1) rows nearly every frame would pick the same rows), saved with
preprocessor_config.json. Ours: `SpeechTokenizer.from_pretrained(folder).encode((wave, sr))`;
official: `Qwen3TTSTokenizer.from_pretrained(folder).encode(wave, sr=sr).audio_codes`.
Input: tests/test_codec_encoder.py `speech_like` (voiced syllables + fricative bursts) at 24 kHz.

Speaker encoder: the official `Qwen3TTSSpeakerEncoder(Qwen3TTSSpeakerEncoderConfig())` (full size,
enc_dim 1024), torch.manual_seed(0) default init, saved as `speaker_encoder.*` in model.safetensors.
Ours: `speaker_encoder.load_params` + `extract_xvector`; official: `mel_spectrogram` + module forward
as `extract_speaker_embedding` does.

first s: the first call at that length (ours: includes XLA compilation of the shape bucket);
warm s: the best of --repeats further calls. Appends a dated section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SR = 24000


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [s.split(":", 1)[1].strip() for s in out.splitlines() if s.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def load_str() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, repeats):
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t)
    return out, first, min(warm)


def build_full_codec(path, seed=0):
    """The official codec at the released sizes, randomized as described above."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from full_configs import CODEC
    from official import build_codec
    from test_codec_encoder import randomize_encoder_

    codec = build_codec(path, config=CODEC, seed=seed)   # randomize_codec_ + audible decoder
    randomize_encoder_(codec.encoder, seed)
    codec.save_pretrained(path)                            # preprocessor_config.json kept
    return codec


def bench_codec(args, folder):
    from qwen_tts import Qwen3TTSTokenizer
    from test_codec_encoder import speech_like

    from qwen3_tts_jax.codec import SpeechTokenizer

    t = time.perf_counter()
    build_full_codec(folder)
    log(f"codec built in {time.perf_counter() - t:.0f} s")
    ours_tok = SpeechTokenizer.from_pretrained(folder)
    off_tok = Qwen3TTSTokenizer.from_pretrained(folder)
    rows = []
    for sec in args.codec_seconds:
        wave = speech_like(sec, seed=int(sec * 10))
        log(f"codec encode {sec} s: official")
        with torch.no_grad():
            ref, o_first, o_warm = timed(lambda: off_tok.encode(wave, sr=SR).audio_codes,
                                         args.repeats)
        ref = ref[0].cpu().numpy().astype(np.int32)
        log(f"codec encode {sec} s: ours")
        codes, u_first, u_warm = timed(lambda: ours_tok.encode((wave, SR)), args.repeats)
        codes = np.asarray(codes[0])
        same = codes.shape == ref.shape and bool((codes == ref).all())
        frac = float((codes == ref).mean()) if codes.shape == ref.shape else float("nan")
        distinct = len({tuple(r) for r in ref.tolist()})
        rows.append(dict(seconds=sec, frames=ref.shape[0], distinct=distinct, same=same,
                         frac=frac, o_first=o_first, o_warm=o_warm, u_first=u_first,
                         u_warm=u_warm))
        log(rows[-1])
    return rows


def bench_speaker(args, folder):
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder, mel_spectrogram
    from safetensors.torch import save_file
    from test_codec_encoder import speech_like

    from qwen3_tts_jax import speaker_encoder as se
    from qwen3_tts_jax.config import SpeakerEncoderConfig

    torch.manual_seed(0)
    off_cfg = Qwen3TTSSpeakerEncoderConfig()
    module = Qwen3TTSSpeakerEncoder(off_cfg).eval()
    os.makedirs(folder, exist_ok=True)
    save_file({f"speaker_encoder.{k}": v.contiguous() for k, v in module.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    kw = {k: getattr(off_cfg, k) for k in ("mel_dim", "enc_dim", "enc_channels", "enc_kernel_sizes",
                                           "enc_dilations", "enc_attention_channels",
                                           "enc_res2net_scale", "enc_se_channels", "sample_rate")}
    cfg = SpeakerEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    params = se.load_params(folder, cfg)
    n_params = sum(p.numel() for p in module.parameters()) / 1e6

    def official(wave):
        with torch.inference_mode():
            mels = mel_spectrogram(torch.from_numpy(wave).unsqueeze(0), n_fft=1024, num_mels=128,
                                   sampling_rate=24000, hop_size=256, win_size=1024, fmin=0,
                                   fmax=12000).transpose(1, 2)
            return module(mels.to(torch.float32))[0].numpy()

    rows = []
    for sec in args.spk_seconds:
        wave = speech_like(sec, seed=100 + int(sec * 10))
        log(f"speaker encoder {sec} s")
        ref, o_first, o_warm = timed(lambda: official(wave), args.repeats)
        ours, u_first, u_warm = timed(lambda: np.asarray(se.extract_xvector(params, cfg, wave)),
                                      args.repeats)
        diff = float(np.abs(ours - ref).max())
        rows.append(dict(seconds=sec, diff=diff, rel=diff / float(np.abs(ref).max()),
                         o_first=o_first, o_warm=o_warm, u_first=u_first, u_warm=u_warm))
        log(rows[-1])
    return rows, n_params, cfg


def report(args, codec_rows, spk_rows, n_spk, spk_cfg, loads) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"## Encoders (codec encoder, speaker encoder), full size, CPU ({now})",
        "",
        f"`python benchmarks/bench_encoders.py --codec-seconds "
        f"{' '.join(map(str, args.codec_seconds))} --spk-seconds "
        f"{' '.join(map(str, args.spk_seconds))} --repeats {args.repeats}`: random weights, "
        f"float32, batch 1, speech-like audio (tests/test_codec_encoder.py `speech_like`) at 24 kHz.",
        f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), JAX {jax.__version__}. Load average (1/5/15 min) "
        f"at start {loads[0]}, at end {loads[1]} (other jobs share the machine).",
        "",
        "Codec (Mimi) encoder, full_configs.CODEC (`Qwen3TTSTokenizer.encode` vs "
        "`SpeechTokenizer.encode`):",
        "",
        "| audio s | frames | distinct frames | identical codes | official first s | official warm s "
        "| ours first s | ours warm s | ours/official (warm speed) |",
        "|" + " --- |" * 9,
    ]
    for r in codec_rows:
        same = "yes" if r["same"] else f"no ({r['frac']:.1%} equal)"
        lines.append(f"| {r['seconds']:g} | {r['frames']} | {r['distinct']} | {same} "
                     f"| {r['o_first']:.2f} | {r['o_warm']:.2f} | {r['u_first']:.2f} "
                     f"| {r['u_warm']:.2f} | {r['o_warm'] / r['u_warm']:.2f} |")
    lines += [
        "",
        f"Speaker encoder, `Qwen3TTSSpeakerEncoderConfig()` defaults (enc_dim {spk_cfg.enc_dim}, "
        f"channels {list(spk_cfg.enc_channels)}, {n_spk:.1f}M params; official mel + forward "
        f"as `extract_speaker_embedding` vs `extract_xvector`):",
        "",
        "| audio s | max abs diff | diff / peak | official first s | official warm s "
        "| ours first s | ours warm s | ours/official (warm speed) |",
        "|" + " --- |" * 8,
    ]
    for r in spk_rows:
        lines.append(f"| {r['seconds']:g} | {r['diff']:.2e} | {r['rel']:.2e} | {r['o_first']:.2f} "
                     f"| {r['o_warm']:.2f} | {r['u_first']:.2f} | {r['u_warm']:.2f} "
                     f"| {r['o_warm'] / r['u_warm']:.2f} |")
    lines += ["", "first s: the first call at that length (ours includes XLA compilation of its "
              "shape bucket; the official's first call includes eager warm-up); warm s: best of "
              f"{args.repeats} further calls.", ""]
    return "\n".join(lines)


def append_results(path: str, section: str):
    """Append only (read-modify-write of the tail): other benchmarks add their own sections."""
    with open(path, "a+") as f:
        f.seek(0)
        text = f.read()
        missing = 2 - (len(text) - len(text.rstrip("\n"))) if text else 0
        f.write("\n" * max(missing, 0) + section + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec-seconds", type=float, nargs="+", default=[4.0, 10.0])
    ap.add_argument("--spk-seconds", type=float, nargs="+", default=[3.0, 10.0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                    help="markdown file the section is appended to ('' to skip)")
    args = ap.parse_args()
    loads = [load_str()]
    with tempfile.TemporaryDirectory(prefix="bench_encoders_") as tmp:
        spk_rows, n_spk, spk_cfg = bench_speaker(args, os.path.join(tmp, "spk"))
        codec_rows = bench_codec(args, os.path.join(tmp, "codec"))
    loads.append(load_str())
    section = report(args, codec_rows, spk_rows, n_spk, spk_cfg, loads)
    print(section)
    if args.results:
        append_results(args.results, section)


if __name__ == "__main__":
    main()
