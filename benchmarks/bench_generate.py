"""Full-size CustomVoice generation on this CPU: ours (JAX) and the official qwen-tts (PyTorch)
side by side in one run, random weights, float32, batch 1.

    python benchmarks/bench_generate.py [--frames 50] [--threads 2] [--size 0b6]

The run writes a random-weight checkpoint with the official classes (torch seed 0) to a temporary
folder, then runs each implementation in its own subprocess, so that ru_maxrss is that
implementation's peak host memory; the parent only measures memory bandwidth, collects the JSON
results, prints the table and appends it to benchmarks/RESULTS.md. No tokenizer is needed: the
prompt is token ids, "<|im_start|>assistant\\n" + 24 random text ids +
"<|im_end|>\\n<|im_start|>assistant\\n", spoken by "ryan" in English, non-streaming.

Per implementation and mode (greedy; sampled with the official generation_config.json defaults):
  warm s      a warm generate of FRAMES frames (the first call of each mode is the cold one)
  cold-warm s the first call of a mode minus the warm call (compilation, eager warm-up; noisy
              when other jobs share the CPU)
  compile s   ours only: JAX tracing + lowering + XLA compilation, as JAX reports it. Greedy and
              sampled share one program (settings are traced), so only the first mode compiles.
  TTFF        warm time to the first frame: ours prefill + decode(until=1), the official generate
              with max_new_tokens=2 (the same work: prompt, code 0, codes 1..15, one talker step)
  xRT         seconds of audio (12.5 frames/s) per second of wall time
Greedy codes of the two must be identical at full size; the first differing frame is reported.

Threads: torch.set_num_threads(threads). XLA:CPU has no thread-count flag; it sizes its thread pool
from the CPUs the process may run on, so when threads < CPUs each child pins itself to `threads`
CPUs (sched_setaffinity) before importing torch or JAX. With threads == CPUs nothing is pinned.

Memory-bandwidth limit: batch-1 decoding reads every weight once per use, so a frame reads the
talker layers + codec head once and the code predictor's layers + one lm_head 15 times. Those
bytes divided by the host bandwidth (a large numpy copy, read + write, measured in the same run)
give the ideal frames/s; each implementation is reported as a fraction of it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FRAME_RATE = 12.5                     # codec frames per second of audio
HEAD = [151644, 77091, 198]           # <|im_start|>assistant\n
TAIL = [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n
TEXT_TOKENS = 24
LANGUAGE, SPEAKER = "english", "ryan"
# The released generation_config.json: written to the checkpoint, and the "sampled" settings.
DEFAULTS = {"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 1.0,
            "repetition_penalty": 1.05, "subtalker_dosample": True, "subtalker_temperature": 0.9,
            "subtalker_top_k": 50, "subtalker_top_p": 1.0, "max_new_tokens": 8192}
MODES = {"greedy": False, "sampled": True}  # do_sample, for the talker and the predictor alike
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def prompt_ids(seed: int = 1) -> list[int]:
    text = np.random.default_rng(seed).integers(1000, 50000, TEXT_TOKENS).tolist()
    return HEAD + text + TAIL


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def rss_gb() -> float:
    """Resident memory now (the peak may be a transient of loading)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def pin_threads(threads: int) -> int:
    """Restrict this process to `threads` CPUs (see the module docstring); returns the CPU count."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])
    return len(os.sched_getaffinity(0))


def measure(generate, first_frame, frames: int) -> dict:
    """generate() -> (codes (T, 16), seconds) for `frames` frames; first_frame() -> seconds."""
    codes, cold = generate()
    codes, warm = generate()
    ttff = min(first_frame() for _ in range(2))
    n = len(codes)
    return {"frames": n, "cold_s": cold, "warm_s": warm, "compile_s": cold - warm, "ttff_s": ttff,
            "frames_per_s": n / warm, "xrt": n / FRAME_RATE / warm,
            "codes": np.asarray(codes).tolist()}


# ------------------------------------------------------------------------------------------------
# Children: each runs in its own process and returns a JSON-able dict
# ------------------------------------------------------------------------------------------------

def build_checkpoint(args) -> dict:
    """The official model with random weights (torch seed 0), saved like a released checkpoint
    minus the tokenizer and speech_tokenizer/ (generation needs neither)."""
    import torch

    sys.path.insert(0, args.official_configs)
    from full_configs import tts_config_kwargs
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    kwargs = tts_config_kwargs(args.size, "custom_voice")
    torch.manual_seed(0)
    model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**kwargs)).eval()
    model.save_pretrained(args.folder)
    # Qwen3TTSSpeakerEncoderConfig takes no **kwargs: the "model_type" key that save_pretrained adds
    # would make config.json unloadable (as in tests/official.py build_checkpoint).
    path = os.path.join(args.folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["speaker_encoder_config"] = {k: v for k, v in config["speaker_encoder_config"].items()
                                        if k in kwargs["speaker_encoder_config"]}
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.folder, "generation_config.json"), "w") as f:
        json.dump(DEFAULTS, f, indent=2)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def run_official(args) -> dict:
    threads = pin_threads(args.threads)
    import torch
    from qwen_tts.core.models import Qwen3TTSForConditionalGeneration as Model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # The class's own from_pretrained also loads speech_tokenizer/ (the codec), unused here; the
    # transformers loader underneath it is what loads the weights.
    model = super(Model, Model).from_pretrained(args.folder, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    input_ids = [torch.tensor([prompt_ids()])]
    sampling = {k: DEFAULTS[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty",
                                         "subtalker_temperature", "subtalker_top_k",
                                         "subtalker_top_p")}

    def generate(frames, do_sample):
        torch.manual_seed(0)
        t = time.perf_counter()
        codes, _ = model.generate(input_ids=input_ids, languages=[LANGUAGE], speakers=[SPEAKER],
                                  non_streaming_mode=True, max_new_tokens=frames + 1,
                                  do_sample=do_sample, subtalker_dosample=do_sample, **sampling)
        return codes[0].numpy(), time.perf_counter() - t

    modes = {}
    for mode, do_sample in MODES.items():
        log(f"official: {mode}")
        modes[mode] = measure(lambda: generate(args.frames, do_sample),
                              lambda: generate(1, do_sample)[1], args.frames)
    return {"version": torch.__version__, "threads": torch.get_num_threads(), "cpus": threads,
            "load_s": load_s, "modes": modes, "peak_rss_gb": peak_rss_gb(), "rss_gb": rss_gb()}


def weight_bytes_per_frame(params) -> dict:
    """Bytes of weights one frame reads at batch 1 (embedding lookups are negligible)."""
    import jax

    size = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    tp, cp = params["talker"], params["code_predictor"]
    talker = size(tp["layers"]) + size(tp["norm"]) + size(tp["codec_head"])
    predictor_step = (size(cp["layers"]) + size(cp["norm"]) + size(cp["lm_head"][0])
                      + size(cp.get("mtp_proj", {})))
    steps = cp["lm_head"].shape[0]  # 15 predictor passes, one per code group 1..15
    return {"talker": talker, "predictor_step": predictor_step, "predictor_steps": steps,
            "total": talker + steps * predictor_step}


def run_ours(args) -> dict:
    threads = pin_threads(args.threads)
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(HERE))
    from qwen3_tts_jax import checkpoint, prompts, sampling
    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.options import Options

    options = Options.for_backend(dtype=jnp.float32)   # what Qwen3TTS.from_pretrained uses
    t0 = time.perf_counter()
    cfg = load_config(args.folder)
    params = jax.block_until_ready(checkpoint.pack_for_inference(
        checkpoint.load_params(args.folder, cfg, jnp.float32), consume=True, options=options))
    load_s = time.perf_counter() - t0
    prompt = prompts.build_prompt(cfg, prompt_ids(), LANGUAGE, SPEAKER, None,
                                  non_streaming_mode=True)
    batch = prompts.batch_prompts(cfg, [prompt], length=gen.bucket(len(prompt)),
                                  trailing_length=gen.bucket(len(prompt.trailing)))
    keys = jnp.stack([jax.random.PRNGKey(0)])
    compiling = {"s": 0.0}

    def on_event(event, duration, **_):
        if event in COMPILE_EVENTS:
            compiling["s"] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)

    def settings(do_sample):
        def params_for(prefix):
            return sampling.SamplingParams.create(
                1, do_sample=do_sample, temperature=DEFAULTS[prefix + "temperature"],
                top_k=DEFAULTS[prefix + "top_k"], top_p=DEFAULTS[prefix + "top_p"],
                options=options)

        return gen.Settings(params_for(""), params_for("subtalker_"),
                            jnp.full((1,), DEFAULTS["repetition_penalty"], jnp.float32),
                            jnp.full((1,), args.frames + 1, jnp.int32))

    def generate(s):
        t = time.perf_counter()
        state = gen.generate(params, cfg, batch, s, keys, max_frames=args.frames, options=options)
        codes = np.asarray(state.codes_BxFxG[0])[:int(state.length_B[0])]
        return codes, time.perf_counter() - t

    def first_frame(s):
        # The frame bucket of generate's first segment: the same compiled programs, no compiling.
        frames = gen.capacity(args.frames, options)
        t = time.perf_counter()
        state, ctx = gen.prefill(params, cfg, batch, s, keys, frames=frames, options=options)
        jax.block_until_ready(gen.decode(params, cfg, state, ctx, s, 1, options))
        return time.perf_counter() - t

    modes = {}
    for mode, do_sample in MODES.items():
        log(f"ours: {mode}")
        s = settings(do_sample)
        before = compiling["s"]
        modes[mode] = measure(lambda: generate(s), lambda: first_frame(s), args.frames)
        modes[mode]["xla_compile_s"] = compiling["s"] - before
    return {"version": jax.__version__, "cpus": threads, "load_s": load_s, "modes": modes,
            "weight_bytes": weight_bytes_per_frame(params), "peak_rss_gb": peak_rss_gb(),
            "rss_gb": rss_gb()}


ROLES = {"build": build_checkpoint, "official": run_official, "ours": run_ours}


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------

def copy_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """Host memory bandwidth (bytes/s) of a numpy copy of `gib` GiB split over `threads` threads,
    counting read + write, best of `reps`."""
    src = np.ones(int(gib * 2**30) // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1).astype(int)
    part = lambda i: np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(part, range(threads)))
            best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def child(role: str, args, workdir: str) -> dict:
    out = os.path.join(workdir, f"{role}.json")
    t = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--role", role, "--folder",
                    args.folder, "--out", out, "--frames", str(args.frames), "--threads",
                    str(args.threads), "--size", args.size, "--official-configs",
                    args.official_configs], check=True)
    log(f"{role}: {time.perf_counter() - t:.0f} s")
    with open(out) as f:
        return json.load(f)


def first_difference(a, b, names=("ours", "official")) -> str | None:
    """None when the code arrays are identical, else where they first differ."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    rows = np.flatnonzero((a[:n] != b[:n]).any(axis=1))
    if len(rows):
        f = int(rows[0])
        g = int(np.flatnonzero(a[f] != b[f])[0])
        return (f"first differing frame {f} (code group {g}: {names[0]} {a[f, g]}, "
                f"{names[1]} {b[f, g]})")
    if len(a) != len(b):
        return (f"identical for {n} frames, then lengths differ ({names[0]} {len(a)}, "
                f"{names[1]} {len(b)})")
    return None


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def report(args, built, official, ours, bandwidth, loads) -> str:
    wb = ours["weight_bytes"]
    ideal = bandwidth / wb["total"]
    rows = ["| implementation | mode | frames | warm s | frames/s | xRT | TTFF ms | cold-warm s "
            "| compile s | peak RSS GB | ours/official (frames/s) |", "|" + " --- |" * 11]
    for name, res in (("official (torch)", official), ("ours (JAX)", ours)):
        for mode, m in res["modes"].items():
            ratio = (f"{m['frames_per_s'] / official['modes'][mode]['frames_per_s']:.2f}"
                     if res is ours else "")
            compiled = f"{m['xla_compile_s']:.1f}" if "xla_compile_s" in m else ""
            rows.append(f"| {name} | {mode} | {m['frames']} | {m['warm_s']:.2f} "
                        f"| {m['frames_per_s']:.2f} | {m['xrt']:.3f} | {1000 * m['ttff_s']:.0f} "
                        f"| {m['compile_s']:.1f} | {compiled} | {res['peak_rss_gb']:.2f} "
                        f"| {ratio} |")
    diff = first_difference(ours["modes"]["greedy"]["codes"], official["modes"]["greedy"]["codes"])
    parity = ("identical" if diff is None else f"DIFFERENT: {diff}")
    fraction = lambda res: res["modes"]["greedy"]["frames_per_s"] / ideal
    load = lambda avg: "/".join(f"{x:.2f}" for x in avg)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"## Generation, {args.size} CustomVoice, CPU ({now})",
        "",
        f"`python benchmarks/bench_generate.py --frames {args.frames} --threads {args.threads} "
        f"--size {args.size}`: full-size random weights ({built['params_m']:.0f}M params), "
        f"float32, batch 1, {TEXT_TOKENS} text tokens, non-streaming, speaker {SPEAKER}.",
        f"{cpu_model()}, {os.cpu_count()} cores; {args.threads} threads (torch "
        f"{official['version']}: set_num_threads; JAX {ours['version']}: XLA:CPU uses the "
        f"{ours['cpus']} CPUs it may run on). Load average (1/5/15 min) at start "
        f"{load(loads[0])}, at end {load(loads[1])}.",
        "",
        *rows,
        "",
        f"- Greedy codes, ours vs official, float32 at full size: **{parity}**.",
        f"- Memory-bandwidth limit: a frame reads {wb['total'] / 1e9:.2f} GB of f32 weights "
        f"(talker layers + codec head {wb['talker'] / 1e9:.2f} GB once, predictor layers + one "
        f"lm_head {wb['predictor_step'] / 1e9:.3f} GB x {wb['predictor_steps']}); host copy "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s (numpy, read + write, {args.threads} threads) "
        f"=> ideal {ideal:.2f} frames/s. Greedy: ours {fraction(ours):.0%} of it, official "
        f"{fraction(official):.0%}.",
        f"- Load time: ours {ours['load_s']:.1f} s (`checkpoint.load_params` from the official "
        f"safetensors), official {official['load_s']:.1f} s (transformers `from_pretrained`, "
        f"memory-mapped). Resident memory at the end: ours {ours['rss_gb']:.2f} GB, official "
        f"{official['rss_gb']:.2f} GB.",
        "",
    ]
    return "\n".join(lines)


def ab_report(title: str, script: str, argv, args, load0, how: str, lines: list[str]) -> str:
    """A side-by-side benchmark's RESULTS section: `title` with the time, then the machine, JAX,
    commit, weights and codec precision (`args.quantize`, `args.codec_precision`), the load
    before (`load0`) and after, the command, `how` it ran, and the table `lines`. Printed, and
    appended to `args.results` when given."""
    import jax

    root = os.path.dirname(HERE)
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"## {title} ({when} UTC)\n\n"
            f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, JAX {jax.__version__}, "
            f"commit {commit}; {args.quantize or 'model dtype'} weights, {args.codec_precision} "
            f"codec; load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after. "
            f"`python benchmarks/{script} {command}` ({how}).\n")
    section = head + "\n" + "\n".join(lines) + "\n"
    print("\n" + section)
    if args.results:
        append_results(args.results, section)
    return section


def append_results(path: str, section: str):
    """Append only: other benchmarks add their own sections to the same file."""
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("# Benchmarks\n\n")
    with open(path) as f:
        text = f.read()
    missing = 2 - (len(text) - len(text.rstrip("\n")))  # newlines short of a blank line
    with open(path, "a") as f:
        f.write("\n" * max(missing, 0) + section + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="0b6", choices=["0b6", "1b7"])
    ap.add_argument("--official-configs", default=HERE,
                    help="folder holding full_configs.py (the released model sizes)")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                    help="markdown file the section is appended to ('' to skip)")
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role:
        result = ROLES[args.role](args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    loads = [os.getloadavg()]
    bandwidth = copy_bandwidth(args.threads)
    log(f"host copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as workdir:
        args.folder = os.path.join(workdir, "checkpoint")
        built = child("build", args, workdir)
        official = child("official", args, workdir)
        ours = child("ours", args, workdir)
    loads.append(os.getloadavg())
    section = report(args, built, official, ours, bandwidth, loads)
    print(section)
    if args.results:
        append_results(args.results, section)


if __name__ == "__main__":
    main()
