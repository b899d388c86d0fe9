"""Fine-tuning throughput: codec frames per second of the training step, ours (JAX) and the official
computation (qwen-tts 0.1.1 modules driven like finetuning/sft_12hz.py, tests/test_finetune_official.py
`OfficialSFT`) side by side in one run, on the same random weights and batches.
(sdpa attention on the official side: flash-attn, which sft_12hz.py asks for, is not installed.)

    python benchmarks/bench_finetune.py                      # CPU, preset "small", both
    python benchmarks/bench_finetune.py --no-official --preset 0b6 --batch-size 8 --json out.json
    python benchmarks/bench_finetune.py --no-official --preset 0b6 --lora 8 --memory-plan
    python benchmarks/bench_finetune.py --no-official --preset 0b6 --batch-size 1 --lora 8 --skip-full

`--lora RANK` runs our step with LoRA adapters (lora.py, alpha = rank, every product) first, then
full fine-tuning (`--skip-full`: LoRA only); `--memory-plan` prints XLA's memory plan of both
compiled steps without allocating or running them; `--layers N` overrides the talker depth.

Backend: JAX's default (a GPU when jax[cuda] sees one; `--device cpu|gpu` forces). Ours runs bf16
compute with f32 master weights on accelerators, f32 on CPU (the trainer's defaults; `--dtype`
overrides). The official side runs on the CPU in float32, or with `--official-device cuda` in
bfloat16 weights under autocast like sft_12hz.py; skip it with --no-official (then torch is not
imported at all and the weights are random JAX arrays).

A step = one micro-batch: forward, backward, and every `--accum` micro-batches gradient clipping +
AdamW, exactly the trainer's `train_step` / the official loop body. Batches: `--batch-size` examples
of 3-5 s of random codes (38-62 frames) and 20-30 random text tokens, padded to one shape bucket
(one compiled program). frames/s = valid (unpadded) codec frames / wall seconds over `--steps`
timed steps after `--warmup` steps (ours compiles in the first). 12.5 frames = 1 s of audio.

Presets (talker + code predictor; the speaker encoder is not in the step, its x-vectors are inputs):
  small  hidden 256, 4 layers, text vocab 4096 (tiny but realistic shapes, minutes on a CPU)
  0b6    the released 0.6B sizes: hidden 1024, 28 layers, 16/8 heads, 151936-token text vocab
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

PRESETS = {
    "small": dict(hidden=256, ffn=768, layers=4, heads=4, kv_heads=2, head_dim=64, text_hidden=256,
                  text_vocab=4096, cp_hidden=256, cp_ffn=768, cp_layers=2, cp_heads=4,
                  cp_kv_heads=2, cp_head_dim=64),
    "0b6": dict(hidden=1024, ffn=3072, layers=28, heads=16, kv_heads=8, head_dim=128,
                text_hidden=2048, text_vocab=151936, cp_hidden=1024, cp_ffn=3072, cp_layers=5,
                cp_heads=16, cp_kv_heads=8, cp_head_dim=128),
}


def model_config(preset: str) -> dict:
    """config.json of a Base checkpoint with the preset's sizes (tests/official.py's layout)."""
    from official import Spec, speaker_encoder_config, talker_config

    spec = Spec(kind="base", size="0b6", **PRESETS[preset])
    return dict(model_type="qwen3_tts", tokenizer_type="qwen3_tts_tokenizer_12hz",
                tts_model_size="0b6", tts_model_type="base",
                talker_config=talker_config(spec, spec.text_vocab),
                speaker_encoder_config=speaker_encoder_config(spec),
                im_start_token_id=1, im_end_token_id=2, tts_pad_token_id=3, tts_bos_token_id=4,
                tts_eos_token_id=5)


def make_examples(cfg, n: int, seed: int):
    from qwen3_tts_jax.finetune.data import Example

    rng = np.random.default_rng(seed)
    V = cfg.talker.text_vocab_size
    return [Example(i, rng.integers(10, V, int(rng.integers(23, 34))).astype(np.int32),
                    rng.integers(0, 2048, (int(rng.integers(38, 63)), 16)).astype(np.int32),
                    "ref") for i in range(n)]


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_plan(args, cfg, batches, lora_rank=None):
    """XLA's buffer assignment for our compiled step (no weights allocated: the step is lowered on
    abstract arrays): argument, output, temporary and aliased bytes, and the peak they imply
    (arguments + outputs + temporaries - aliased, i.e. donated). Full fine-tuning, or LoRA."""
    import jax
    import jax.numpy as jnp

    from qwen3_tts_jax import checkpoint, lora, weights
    from qwen3_tts_jax.finetune import data, train

    dtype = train.resolve_dtype({"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype))
    shapes = {k: s for k, s in checkpoint.fast_expected_shapes(cfg).items()
              if not k.startswith("speaker_encoder/")}
    params = weights.nest({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
    extra = ()
    if lora_rank:
        step = train.make_train_step(cfg, 2e-5, accum_steps=args.accum, compute_dtype=dtype,
                                     lora_scale=1.0)
        extra = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), params),)
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                              lora.init_adapters(params, lora_rank, tuple(lora.TARGETS)))
    else:
        step = train.make_train_step(cfg, 2e-5, accum_steps=args.accum, compute_dtype=dtype)
    state = jax.eval_shape(lambda p: train.init_opt_state(train.make_optimizer(), p), params)
    length = max(len(e.text_ids) + len(e.codes) for b in batches for e in b) + 8
    frames = max(len(e.codes) for b in batches for e in b)
    host = data.pad_to(data.collate(batches[0], cfg, {"ref": np.zeros(cfg.talker.hidden_size,
                                                                       np.float32)}),
                       length=data.ladder(length), frames=data.ladder(frames))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
    batch["flush"] = jax.ShapeDtypeStruct((), np.bool_)
    t0 = time.perf_counter()
    m = step.lower(params, state, batch, jax.random.key(0), *extra).compile().memory_analysis()
    gib = 1 / 2**30
    trained = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return dict(impl=f"ours (JAX), LoRA rank {lora_rank}" if lora_rank else "ours (JAX), full",
                dtype=str(dtype), trained_params=trained, compile_s=time.perf_counter() - t0,
                argument_gib=m.argument_size_in_bytes * gib, output_gib=m.output_size_in_bytes * gib,
                temp_gib=m.temp_size_in_bytes * gib, alias_gib=m.alias_size_in_bytes * gib,
                peak_gib=(m.argument_size_in_bytes + m.output_size_in_bytes
                          + m.temp_size_in_bytes - m.alias_size_in_bytes) * gib)


def run_ours(args, cfg, params, batches, xvec, lora_rank=None):
    """Our step on the batches: full fine-tuning, or with `lora_rank` LoRA adapters of rank
    lora_rank (alpha = rank) on every product, the base frozen in the compute dtype."""
    import jax
    import jax.numpy as jnp

    from qwen3_tts_jax import lora
    from qwen3_tts_jax.finetune import data, train
    from qwen3_tts_jax.sharding import data_sharding

    rss0 = _peak_rss_mib()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
    batch_sh, repl = data_sharding()
    extra = ()
    if lora_rank:
        step = train.make_train_step(cfg, 2e-5, accum_steps=args.accum, compute_dtype=dtype,
                                     lora_scale=1.0)
        extra = (jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, train.resolve_dtype(dtype)),
                                             params), repl),)
        params = lora.init_adapters(params, lora_rank, tuple(lora.TARGETS))
    else:
        step = train.make_train_step(cfg, 2e-5, accum_steps=args.accum, compute_dtype=dtype)
    params = jax.device_put(params, repl)
    state = jax.device_put(train.init_opt_state(train.make_optimizer(), params), repl)
    trained = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    devices = len(jax.local_devices())
    rows = -(-args.batch_size // devices) * devices
    length = max(len(e.text_ids) + len(e.codes) for b in batches for e in b) + 8
    frames = max(len(e.codes) for b in batches for e in b)
    host = [data.pad_to(data.collate(b, cfg, {"ref": xvec}), rows=rows,
                        length=data.ladder(length), frames=data.ladder(frames)) for b in batches]
    losses, times = [], []
    t_first = time.perf_counter()
    for i, h in enumerate(host):
        t0 = time.perf_counter()
        batch = jax.device_put(h, batch_sh)
        batch["flush"] = jax.device_put(np.bool_(False), repl)
        params, state, m = step(params, state, batch, jax.random.key(0), *extra)
        losses.append(float(m["loss"]))             # waits for the step
        times.append(time.perf_counter() - t0)
        if i == 0:
            first = time.perf_counter() - t_first
    timed = times[args.warmup:]
    n_frames = sum(data.batch_frames(h) for h in host[args.warmup:])
    return dict(impl=f"ours (JAX), LoRA rank {lora_rank}" if lora_rank else "ours (JAX)",
                trained_params=trained, peak_rss_mib=_peak_rss_mib(), rss_before_mib=rss0,
                device=f"{jax.devices()[0].device_kind} x{devices}",
                dtype=str(jnp.dtype(dtype or (jnp.float32 if jax.default_backend() == "cpu"
                                              else jnp.bfloat16))),
                frames_per_s=n_frames / sum(timed), step_s=float(np.median(timed)),
                first_step_s=first, losses=losses,
                padded_frames=int(rows * data.ladder(frames) * len(timed)), frames=n_frames)


def run_official(args, model, batches_torch):
    import types

    import torch

    from test_finetune_official import OfficialSFT

    torch.set_num_threads(args.threads)
    cuda = args.official_device == "cuda"
    if cuda:        # sft_12hz.py: weights loaded in bf16, accelerate mixed_precision="bf16"
        model = model.to("cuda", torch.bfloat16)
        batches_torch = [{k: v.to("cuda") for k, v in b.items()} for b in batches_torch]
    sft = OfficialSFT(types.SimpleNamespace(model=model))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    losses, times = [], []
    for i, b in enumerate(batches_torch):
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = sft.loss(b)[0]
        (loss / args.accum).backward()
        if (i + 1) % args.accum == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    n_frames = sum(int(b["codec_mask"].sum()) for b in batches_torch[args.warmup:])
    return dict(impl="official (torch)",
                device=torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads",
                dtype="bfloat16" if cuda else "float32",
                frames_per_s=n_frames / sum(timed), step_s=float(np.median(timed)),
                first_step_s=times[0], losses=losses, frames=n_frames)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (official side)")
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--official-device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the official in bf16 weights + autocast, as sft_12hz.py runs")
    ap.add_argument("--lora", type=int, metavar="RANK",
                    help="also run ours with LoRA adapters of this rank (first, so that the "
                         "process's peak memory after it is LoRA's), then full fine-tuning")
    ap.add_argument("--layers", type=int, help="talker layers (default: the preset's)")
    ap.add_argument("--skip-full", action="store_true",
                    help="with --lora: run only the LoRA step (full fine-tuning of the preset "
                         "may not fit this machine's memory)")
    ap.add_argument("--memory-plan", action="store_true",
                    help="with --lora: print XLA's memory plan of the LoRA and the full step "
                         "(compiled on abstract arrays, nothing allocated, no step run) and exit")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    elif args.device == "gpu":
        os.environ["JAX_PLATFORMS"] = "cuda"
    load0 = os.getloadavg()
    import jax

    from qwen3_tts_jax.config import parse_config

    if jax.default_backend() == "cpu":
        jax.config.update("jax_default_matmul_precision", "float32")
    conf = model_config(args.preset)
    if args.layers:
        conf["talker_config"]["num_hidden_layers"] = args.layers
    cfg = parse_config(conf)
    n = args.batch_size * (args.warmup + args.steps)
    examples = make_examples(cfg, n, seed=0)
    batches = [examples[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    results = []
    if args.memory_plan:
        plans = [memory_plan(args, cfg, batches, args.lora), memory_plan(args, cfg, batches)]
        print(json.dumps(dict(preset=args.preset, layers=args.layers, batch_size=args.batch_size,
                              plans=plans, date=datetime.datetime.now(
                                  datetime.timezone.utc).isoformat(timespec="minutes")), indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.no_official:
            params, xvec = random_params(cfg), np.random.default_rng(1).standard_normal(
                cfg.talker.hidden_size).astype(np.float32) * 0.1
        else:
            params, xvec, model, torch_batches = official_setup(conf, cfg, batches, tmp)
        if args.lora:
            results.append(run_ours(args, cfg, params, batches, xvec, args.lora))
        if not (args.lora and args.skip_full):
            results.append(run_ours(args, cfg, params, batches, xvec))
        del params
        if not args.no_official:
            results.append(run_official(args, model, torch_batches))
    report(args, results, load0, os.getloadavg())


def random_params(cfg):
    """Random float32 params of the talker + code predictor (no torch): N(0, 0.02), norms 1."""
    import jax.numpy as jnp

    from qwen3_tts_jax import checkpoint, weights

    rng = np.random.default_rng(0)
    shapes = {k: s for k, s in checkpoint.fast_expected_shapes(cfg).items()
              if not k.startswith("speaker_encoder/")}
    flat = {k: jnp.asarray(np.ones(s, np.float32) if k.endswith("norm") and len(s) == 1 else
                           (0.02 * rng.standard_normal(s)).astype(np.float32))
            for k, s in shapes.items()}
    return weights.nest(flat)


def official_setup(conf, cfg, batches, tmp):
    """Official random model (seed 0) saved in the checkpoint layout; ours loads the same weights.
    The x-vector both sides use: the official speaker encoder on the batches' reference mel (the
    official recomputes it every step, inside its timing; ours takes it as an input)."""
    import torch
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration
    from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram

    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.finetune import data, train

    torch.manual_seed(0)
    c = dict(conf)
    model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**{k: v for k, v in c.items()
                                                               if k != "model_type"})).eval()
    folder = os.path.join(tmp, "ckpt")
    model.save_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    saved["speaker_encoder_config"] = conf["speaker_encoder_config"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(saved, f)
    wave = np.random.default_rng(2).standard_normal(24000 * 3).astype(np.float32) * 0.1
    mel = mel_spectrogram(torch.from_numpy(wave)[None], n_fft=1024, num_mels=128,
                          sampling_rate=24000, hop_size=256, win_size=1024, fmin=0,
                          fmax=12000).transpose(1, 2)
    with torch.no_grad():
        xvec = model.speaker_encoder(mel)[0].numpy()
    params = train.trainable(checkpoint.load_params(folder, cfg, np.float32))
    torch_batches = []
    for b in batches:
        h = data.collate(b, cfg)
        tb = {k: torch.from_numpy(v.astype(np.int64) if v.dtype != bool else v)
              for k, v in h.items()}
        tb["ref_mels"] = mel.repeat(len(b), 1, 1)
        torch_batches.append(tb)
    return params, xvec, model, torch_batches


def report(args, results, load0, load1):
    import jax

    import optax

    now = datetime.datetime.now(datetime.timezone.utc)
    versions = f"JAX {jax.__version__}, optax {optax.__version__}"
    if not args.no_official:
        import torch

        versions = f"torch {torch.__version__} ({args.threads} threads), " + versions
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = dict(preset=args.preset, batch_size=args.batch_size, accum=args.accum,
               steps=args.steps, warmup=args.warmup, date=now.isoformat(timespec="minutes"),
               cpu=cpu, cpus=os.cpu_count(), versions=versions, load_start=load0, load_end=load1,
               results=results)
    if not args.no_official:
        l_ours, l_off = results[-2]["losses"][0], results[-1]["losses"][0]
        out["first_loss_rel_diff"] = abs(l_ours - l_off) / abs(l_off)
        out["speedup"] = results[-2]["frames_per_s"] / results[-1]["frames_per_s"]
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.no_append:
        return
    lines = [f"\n## Fine-tuning throughput, preset {args.preset}, batch {args.batch_size}, "
             f"accumulation {args.accum} ({now:%Y-%m-%d %H:%M} UTC)\n",
             f"`python benchmarks/bench_finetune.py --preset {args.preset} --batch-size "
             f"{args.batch_size} --accum {args.accum} --steps {args.steps} --warmup "
             f"{args.warmup}" + (f" --layers {args.layers}" if args.layers else "")
             + (f" --lora {args.lora}" if args.lora else "")
             + (" --no-official" if args.no_official else "") + "`: random weights, random "
             "codes of 38-62 frames (3-5 s) and 23-33 text tokens per example, one shape bucket; "
             f"{args.steps} timed micro-batches after {args.warmup} warm-up ones.",
             f"{cpu}, {os.cpu_count()} CPUs; {versions}. Load average (1/5/15 min) at start "
             f"{'/'.join(f'{x:.2f}' for x in load0)}, at end {'/'.join(f'{x:.2f}' for x in load1)}.",
             "", "| implementation | device | dtype | frames/s | median step s | first step s | "
             "trained params | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['impl']} | {r['device']} | {r['dtype']} | {r['frames_per_s']:.1f} | "
                     f"{r['step_s']:.3f} | {r['first_step_s']:.2f} | "
                     f"{r.get('trained_params', '')} | {r.get('peak_rss_mib', 0):.0f} |")
    if not args.no_official:
        lines.append(f"\n- ours / official: **{out['speedup']:.2f}x** frames/s; first-step loss "
                     f"relative difference {out['first_loss_rel_diff']:.1e} (same weights and "
                     "batches). Ours' first step includes XLA compilation.")
    with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
