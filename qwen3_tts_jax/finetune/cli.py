"""`qwen3-tts-jax prepare-data` and `qwen3-tts-jax finetune` (registered in cli.EXTRA_COMMANDS).

    qwen3-tts-jax prepare-data --model Qwen/Qwen3-TTS-12Hz-0.6B-Base \\
        --input train_raw.jsonl --output train_with_codes.jsonl
    qwen3-tts-jax finetune --init-model Qwen/Qwen3-TTS-12Hz-0.6B-Base \\
        --train-jsonl train_with_codes.jsonl --output out --speaker-name my_voice --epochs 3

Top-level imports stay light: `qwen3-tts-jax --help` imports this module.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(sub, common) -> None:
    del common  # these commands take no generation options
    pd = sub.add_parser(
        "prepare-data", help="fine-tuning data: add the 16-codebook audio_codes to a JSONL",
        description="Read the official fine-tuning JSONL (audio, text, ref_audio per line) and "
                    "write it again with 'audio_codes' from the speech tokenizer's encoder, like "
                    "the official finetuning/prepare_data.py. Resumable: rerun the same command "
                    "after a kill. Bad lines are reported by number and skipped (exit code 1).")
    pd.add_argument("--model", required=True,
                    help="a Qwen3-TTS checkpoint folder or hub id (its speech_tokenizer/ is "
                         "used), or the speech tokenizer itself (Qwen/Qwen3-TTS-Tokenizer-12Hz)")
    pd.add_argument("--input", required=True, help="train_raw.jsonl")
    pd.add_argument("--output", required=True, help="train_with_codes.jsonl")
    pd.add_argument("--batch-size", type=int, default=32, help="clips encoded together (32)")
    pd.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    pd.set_defaults(run=run_prepare)

    ft = sub.add_parser(
        "finetune", help="fine-tune a Base checkpoint into a CustomVoice speaker",
        description="Single-speaker SFT of a Base checkpoint (the official finetuning/"
                    "sft_12hz.py, with its label-alignment bugs fixed; docs/finetuning.md). "
                    "Writes OUTPUT/checkpoint-epoch-N after each epoch: a CustomVoice checkpoint "
                    "with the new speaker, loadable by this package and by qwen-tts. Rerun the "
                    "same command after a kill to resume from OUTPUT/resume.")
    ft.add_argument("--init-model", required=True, help="Base checkpoint folder or hub id")
    ft.add_argument("--train-jsonl", required=True, help="JSONL with audio_codes (prepare-data)")
    ft.add_argument("--output", required=True, help="output folder")
    ft.add_argument("--speaker-name",
                    help="name of the new speaker: the speaker of every line without a "
                         "\"speaker\" key (required unless every line has one)")
    ft.add_argument("--batch-size", type=int, default=2, help="examples per micro-batch (2)")
    ft.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (2e-5)")
    ft.add_argument("--epochs", type=int, default=3, help="epochs (3)")
    ft.add_argument("--grad-accum", type=int, default=4,
                    help="micro-batches per optimizer step (4)")
    ft.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (0.01)")
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (1.0)")
    ft.add_argument("--seed", type=int, default=0, help="shuffling seed (0)")
    ft.add_argument("--save-every", type=int, default=50,
                    help="write the resume state every N optimizer steps (50; 0: epoch ends only)")
    ft.add_argument("--dtype", choices=["float32", "bfloat16"],
                    help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU); master "
                         "weights and optimizer state are always float32")
    ft.add_argument("--remat", choices=["on", "off"],
                    help="recompute layers in the backward pass to save memory (default: on for "
                         "GPU/TPU, off on CPU)")
    ft.add_argument("--fixed-shapes", action="store_true",
                    help="pad every batch to the longest example of the dataset: one compiled "
                         "program (default: per-batch shape buckets, less padding)")
    ft.add_argument("--no-compile-cache", action="store_true",
                    help="do not keep compiled programs in ~/.cache/qwen3-tts-jax/xla")
    ms = ft.add_argument_group("several speakers (a line's \"speaker\" key)")
    ms.add_argument("--speaker-balance", action=argparse.BooleanOptionalAction, default=True,
                    help="give every speaker an equal share of each epoch, repeating the lines "
                         "of a speaker with few (default: on)")
    ms.add_argument("--replace-speaker", action="store_true",
                    help="starting from a CustomVoice checkpoint: retrain a speaker it already "
                         "has (default: an existing name is an error)")
    ms.add_argument("--speaker-encoder", metavar="BASE",
                    help="starting from a CustomVoice checkpoint (--init-model): a Base "
                         "checkpoint of the same size whose speaker encoder makes the x-vectors")
    lo = ft.add_argument_group("LoRA adapters (instead of full fine-tuning)")
    lo.add_argument("--lora", type=int, metavar="RANK",
                    help="train rank-RANK adapters only (the base stays frozen); each epoch "
                         "writes an adapter folder (adapter.safetensors + adapter_config.json) "
                         "for --adapter or merge-adapter")
    lo.add_argument("--lora-alpha", type=float, help="adapter scale alpha / rank (alpha "
                                                     "default: the rank)")
    lo.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                    help="adapted products of every talker and code predictor layer "
                         "(default: q,k,v,o,gate,up,down)")
    lo.add_argument("--freeze-speaker-rows", action="store_true",
                    help="keep the new speakers' rows at their mean x-vectors and feed each "
                         "line its own reference's x-vector (default: the rows train with the "
                         "adapters and each line feeds its speaker's row)")
    ev = ft.add_argument_group("evaluation")
    evx = ev.add_mutually_exclusive_group()
    evx.add_argument("--eval-jsonl", help="held-out JSONL (with audio_codes): its loss after "
                                          "each epoch")
    evx.add_argument("--eval-fraction", type=float,
                     help="hold out this fraction of the training lines (chosen by --seed)")
    ev.add_argument("--best", action="store_true",
                    help="keep OUTPUT/checkpoint-best: the epoch with the lowest eval loss")
    ev.add_argument("--plot", action="store_true",
                    help="draw OUTPUT/metrics.jsonl (loss per step, eval loss per epoch) to "
                         "OUTPUT/loss.png at the end")
    ft.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ft.set_defaults(run=run_finetune)

    mg = sub.add_parser(
        "merge-adapter", help="merge a LoRA adapter into its base: a full checkpoint",
        description="Write BASE with the adapter merged (float32 arithmetic, rounded once to "
                    "each tensor's dtype) and its speakers added, as a CustomVoice checkpoint "
                    "in the official layout (the official qwen-tts loads it).")
    mg.add_argument("base", help="the base checkpoint the adapter was trained on")
    mg.add_argument("adapter", nargs="+", help="adapter folder(s) (finetune --lora output)")
    mg.add_argument("out", help="output checkpoint folder")
    mg.set_defaults(run=run_merge)


def _errors_as_messages(fn):
    """Bad input ends with one line naming the problem, not a traceback."""
    def run(args):
        try:
            return fn(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"qwen3-tts-jax {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


@_errors_as_messages
def run_prepare(args: argparse.Namespace) -> int:
    from ..codec import SpeechTokenizer
    from .data import prepare_data

    tok = SpeechTokenizer.from_pretrained(args.model)
    res = prepare_data(tok, args.input, args.output, batch_size=args.batch_size,
                       progress=not args.quiet)
    if res.get("already_done"):
        print(f"{args.output} already exists; nothing to do (delete it to encode again)")
        return 0
    print(f"wrote {res['output']}: {res['written']} line(s) encoded"
          + (f", {res['skipped_lines']} done before" if res["skipped_lines"] else ""))
    if res["failed"]:
        print(f"{len(res['failed'])} line(s) skipped:", file=sys.stderr)
        for p in res["failed"]:
            print(f"  {p}", file=sys.stderr)
        return 1
    return 0


@_errors_as_messages
def run_finetune(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from ..compilation_cache import enable_compilation_cache
    from .train import finetune

    if not args.no_compile_cache:      # a resumed run after a kill starts without recompiling
        enable_compilation_cache()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
    remat = {"on": True, "off": False}.get(args.remat)
    res = finetune(args.init_model, args.train_jsonl, args.output, args.speaker_name,
                   batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
                   accum_steps=args.grad_accum, weight_decay=args.weight_decay,
                   max_grad_norm=args.max_grad_norm, seed=args.seed, save_every=args.save_every,
                   compute_dtype=dtype, remat=remat, progress=not args.quiet,
                   fixed_shapes=args.fixed_shapes, speaker_balance=args.speaker_balance,
                   replace_speaker=args.replace_speaker, speaker_encoder=args.speaker_encoder,
                   lora_rank=args.lora, lora_alpha=args.lora_alpha,
                   lora_targets=args.lora_targets, eval_jsonl=args.eval_jsonl,
                   eval_fraction=args.eval_fraction, best=args.best,
                   freeze_speaker_rows=args.freeze_speaker_rows)
    if args.plot:
        import os

        from .plot import plot_metrics

        print("plot:", plot_metrics(os.path.join(args.output, "metrics.jsonl"),
                                    os.path.join(args.output, "loss.png")))
    fps = res["frames_per_second"]
    print(f"done: {res['steps']} batch(es) this run"
          + (f", {fps:.1f} frames/s" if fps else "") + "; checkpoints: "
          + (", ".join(res["checkpoints"]) or "none new"))
    return 0


@_errors_as_messages
def run_merge(args: argparse.Namespace) -> int:
    from .export import merge_adapters

    out = merge_adapters(args.base, args.adapter, args.out)
    print(f"wrote {out}")
    return 0
