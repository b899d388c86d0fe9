"""In-process A/B of the speech tokenizer's decoder: qwen3_tts_jax/codec/decoder.py at a git ref
against the working tree's, full size, random weights, float32, batch 1, on this CPU.

    python benchmarks/ab_codec_decode.py [--ref HEAD] [--frames 40] [--chunk 8] [--repeats 5]
                                         [--folder DIR]

Both decoders run in one process, alternating call by call (the machine is shared: load varies,
so pairs are compared, not runs): `decode` of --frames frames (offline) and `stream_decode` of the
same frames pushed --chunk at a time (streaming), each jitted with its params as arguments, as
`SpeechTokenizer` runs them. Each side loads the official model.safetensors with its own `RULES`
(the ref's layout may differ). Prints the waveform difference from the ref (max |diff| / peak),
wall and process CPU seconds (median), the speed-up as the median of pair ratios, and the load
average. --folder: a codec folder (official layout) to reuse; by default the released decoder
sizes are built with tests/test_codec_decoder.py `build_parity_codec` in a temporary folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen3_tts_jax.codec import SpeechTokenizer  # noqa: E402
from qwen3_tts_jax.codec import decoder as current  # noqa: E402
from qwen3_tts_jax.weights import load_official, safetensors_files  # noqa: E402


def module_at(ref: str, folder: str):
    src = subprocess.run(["git", "show", f"{ref}:qwen3_tts_jax/codec/decoder.py"], cwd=HERE,
                         capture_output=True, text=True, check=True).stdout
    path = os.path.join(folder, "decoder_at_ref.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("qwen3_tts_jax.codec._decoder_at_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="HEAD")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--folder")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from test_codec_decoder import FULL_DECODER, build_parity_codec
            folder = os.path.join(tmp, "codec")
            build_parity_codec(folder, FULL_DECODER, frames=args.frames)
        ref_mod = module_at(args.ref, tmp)
        tok = SpeechTokenizer.from_pretrained(folder)
        cfg = tok.config.decoder
        ref_params = load_official(safetensors_files(folder), ref_mod.RULES,
                                   ref_mod.expected_shapes(cfg), jnp.float32, "ref",
                                   prefix="decoder.")
        sides = {"ref": (ref_mod, ref_params), "new": (current, tok.params)}
        codes = jnp.asarray(np.random.default_rng(0).integers(
            0, cfg.codebook_size, (1, args.frames, cfg.num_quantizers)).astype(np.int32))

        def offline(mod, params):
            f = jax.jit(lambda p, c: mod.decode(p, cfg, c))
            return lambda: f(params, codes)

        def streaming(mod, params):
            f = jax.jit(lambda p, s, c, n, r: mod.stream_decode(p, cfg, s, c, n, r))

            def run():
                state, out = mod.init_stream_state(params, cfg, 1), []
                for i in range(0, args.frames, args.chunk):
                    c = codes[:, i:i + args.chunk]
                    w, state = f(params, state, c, jnp.full((1,), c.shape[1], jnp.int32),
                                 jnp.zeros((1,), bool))
                    out.append(w)
                return jnp.concatenate(out, 1)
            return run

        runs = {(mode, side): make(*sides[side]) for mode, make in
                (("offline", offline), ("streaming", streaming)) for side in sides}
        base = np.asarray(runs["offline", "ref"]())
        peak = np.abs(base).max()
        for (mode, side), fn in runs.items():
            print(f"{mode:9s} {side}: max |diff| / peak vs ref offline "
                  f"{np.abs(np.asarray(fn()) - base).max() / peak:.1e}")
        load = os.getloadavg()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t, c = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn())
                times[k].append((time.perf_counter() - t, time.process_time() - c))
        print(f"load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
              f"ref {args.ref}, {args.frames} frames, streaming in chunks of {args.chunk}")
        for mode in ("offline", "streaming"):
            r, n = np.array(times[mode, "ref"]), np.array(times[mode, "new"])
            print(f"{mode:9s} ref wall {np.median(r[:, 0]):.3f} s cpu {np.median(r[:, 1]):.3f} s | "
                  f"new wall {np.median(n[:, 0]):.3f} s cpu {np.median(n[:, 1]):.3f} s | speed-up "
                  f"wall {np.median(r[:, 0] / n[:, 0]):.2f}x cpu {np.median(r[:, 1] / n[:, 1]):.2f}x")


if __name__ == "__main__":
    main()
