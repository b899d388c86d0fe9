"""`qwen3-tts-jax`: text to a WAV file from the command line.

    qwen3-tts-jax custom-voice --model Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice --speaker ryan \\
        --language english --text "Hello from JAX." --output hello.wav
    qwen3-tts-jax voice-design --model Qwen/Qwen3-TTS-12Hz-1.7B-VoiceDesign \\
        --instruct "A warm, low female voice." --text "Hello." --output hello.wav
    qwen3-tts-jax clone --model Qwen/Qwen3-TTS-12Hz-0.6B-Base --ref-audio me.wav \\
        --ref-text "What I say in me.wav." --save-voice me.voice --text "Hello." --output hi.wav
    qwen3-tts-jax clone --model ... --voice me.voice --text "Hello again." --output again.wav
    qwen3-tts-jax custom-voice --random-weights --text "Hello." --output demo.wav   # offline check
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import threading
import time
import warnings

# Subcommands that live in their own module. Each module defines `add_parser(sub, common)`, which
# adds its subparser(s) with `set_defaults(run=FUNCTION)`; `main` calls `args.run(args)` for them.
# Keep such modules' top-level imports light: `--help` imports them.
EXTRA_COMMANDS: list[str] = ["qwen3_tts_jax.server", "qwen3_tts_jax.finetune.cli",
                             "qwen3_tts_jax.convert"]

# The checkpoint type each speech command needs (and that --random-weights builds for it), and
# what each command is given to pick a voice.
COMMAND_KINDS = {"custom-voice": "custom_voice", "voice-design": "voice_design", "clone": "base"}
KIND_NAMES = {"custom_voice": "CustomVoice", "voice_design": "VoiceDesign", "base": "Base"}
VOICE_FLAGS = {"custom-voice": "--speaker NAME", "voice-design": "--instruct \"DESCRIPTION\"",
               "clone": "--ref-audio FILE --ref-text TEXT (or --voice FILE)"}

from .budget import BUDGET_FLOOR, FRAMES_PER_TOKEN, text_budget  # noqa: E402 - no JAX

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "repetition_penalty", "subtalker_temperature",
                  "subtalker_top_k", "subtalker_top_p", "max_new_tokens", "seed")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen3-tts-jax")
    except PackageNotFoundError:        # run from a source tree without installing
        return "(not installed)"


def _frames_per_token(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        f = float("nan")
    if not 0 <= f < float("inf"):
        raise argparse.ArgumentTypeError(f"takes a number >= 0 (0: off), got {value!r}")
    return f


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3-tts-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    src = common.add_argument_group("model")
    src.add_argument("--model", help="checkpoint folder or Hugging Face hub id")
    src.add_argument("--random-weights", action="store_true",
                     help="OFFLINE CHECK: build a tiny random-weight checkpoint of the type the "
                          "command needs (CustomVoice, VoiceDesign, or Base for clone) in the "
                          "official layout and run the whole pipeline with it (the audio is noise)")
    src.add_argument("--dtype", choices=["float32", "bfloat16"],
                     help="weights dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    src.add_argument("--quantize", choices=["int8", "int4"],
                     help="store the transformers' decoder weights as int8 with a scale per "
                          "column: a quarter of the float32 bytes, 3x the CPU's batch-1 "
                          "speed, not the exact official codes; int4: 4-bit with a scale per "
                          "column and group of 32 k, CPU kernels only (default: the weights as "
                          "they are)")
    src.add_argument("--codec-precision", choices=["float32", "bf16"], default="float32",
                     help="the codec decoder's convolutions: bf16 runs them on AVX-512 BF16 "
                          "CPUs (faster; the audio is close to, not equal to, float32's; "
                          "refused on other machines) (default: float32)")
    src.add_argument("--adapter", action="append", metavar="FOLDER",
                     help="a LoRA adapter (finetune --lora) merged into --model at load; "
                          "repeat for several")
    src.add_argument("--model-parallel", type=int, default=1, metavar="M",
                     help="split the weights over M local devices (tensor parallel; the other "
                          "devices factor split the batch)")
    lang = common.add_argument_group("language and text")
    lang.add_argument("--language", default=None, help='language name or "auto" (default)')
    lang.add_argument("--text-mode", choices=["streaming", "non-streaming"],
                      help="how the talker reads the text: all in the prompt (non-streaming, the "
                           "official default for custom-voice and voice-design) or one token per "
                           "frame (streaming, the official default for clone)")
    g = common.add_argument_group("generation (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (talker and predictor)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--subtalker-temperature", type=float)
    g.add_argument("--subtalker-top-k", type=int)
    g.add_argument("--subtalker-top-p", type=float)
    g.add_argument("--max-new-tokens", type=int,
                   help="the frame budget (12.5 a second; serve: the cap of a request's own). "
                        "Default: --frames-per-token's")
    g.add_argument("--frames-per-token", type=_frames_per_token, default=FRAMES_PER_TOKEN,
                   metavar="F",
                   help="without --max-new-tokens (serve: a request without max_new_tokens), "
                        f"a text's budget is {BUDGET_FLOOR} + F per text token frames, at "
                        "most the checkpoint's max_new_tokens: it bounds a runaway (the model "
                        "now and then never ends) at seconds past the text, not minutes; 0: "
                        "the checkpoint's (the official budget) (default: %(default)g)")
    g.add_argument("--seed", type=int,
                   help="PRNG seed for reproducible sampling (batch: a line without its own "
                        "\"seed\" uses --seed plus its line number, --seed defaulting to 0)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    g.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs in ~/.cache/qwen3-tts-jax/xla and "
                        "~/.cache/qwen3-tts-jax/programs")

    # one utterance to one file (custom-voice, voice-design, clone)
    speech = argparse.ArgumentParser(add_help=False)
    io = speech.add_argument_group("input / output")
    io.add_argument("--text", help="text to speak")
    io.add_argument("--text-file", help="read the text from this file (UTF-8; - for standard "
                                        "input)")
    io.add_argument("--output", "-o", default="output.wav",
                    help="audio file to write; the extension picks the format: .wav (16-bit), "
                         ".flac, .mp3, .opus, .ogg (where this libsndfile writes them)")
    io.add_argument("--list-speakers", action="store_true", help="print the speakers and exit")
    io.add_argument("--list-languages", action="store_true", help="print the languages and exit")

    long = common.add_argument_group("long text")
    long.add_argument("--segment-chars", type=int, default=None, metavar="N",
                      help="say a text longer than N characters in segments of at most N, cut at "
                           "sentence ends (then clauses, words), each generated as its own "
                           "utterance (rows of a batch) and joined: for long texts, which drift "
                           "in one pass (default: one pass, as the official)")
    long.add_argument("--segment-pause", type=float, default=None, metavar="SECONDS",
                      help="silence between segments (default 0.2)")

    # the commands that load a model in this process (serve has its own flags)
    start = argparse.ArgumentParser(add_help=False)
    start.add_argument_group("start-up").add_argument(
        "--weights-cache", metavar="DIR", default=None,
        help="keep the packed (and --quantize'd) weights and the codec's converted decoder in "
             "DIR after the first load, and read them from there on later runs with the same "
             "checkpoint and flags (faster start; one file about the size of the weights per "
             "checkpoint and flags)")

    cv = sub.add_parser("custom-voice", parents=[common, speech, start],
                        help="a preset speaker of a CustomVoice checkpoint")
    cv.add_argument("--speaker", help="speaker name (see --list-speakers)")
    cv.add_argument("--instruct", default=None, help="optional instruction (1.7B only)")
    vd = sub.add_parser("voice-design", parents=[common, speech, start],
                        help="a voice described in words (VoiceDesign checkpoint)")
    vd.add_argument("--instruct", help="description of the voice")
    bt = sub.add_parser("batch", parents=[common, start],
                        help="many utterances to WAV files (JSONL or one text per line)")
    bt.add_argument("input", help="requests: .jsonl (text, name, speaker, instruct, voice or "
                                  "ref_audio with ref_text / x_vector_only_mode, language, "
                                  "seed) or a text file, one utterance per line")
    bt.add_argument("--out-dir", required=True, help="folder for the audio files (NAME.wav)")
    bt.add_argument("--format", default="wav", choices=("wav", "flac", "mp3", "opus", "ogg"),
                    help="audio file format (default wav, 16-bit; mp3/opus/ogg where this "
                         "libsndfile writes them)")
    bt.add_argument("--batch-size", type=int, default=8,
                    help="rows per device batch (default 8): with continuous batching a row "
                         "takes the next request as its utterance ends; with "
                         "--no-continuous-batching, utterances per padded batch")
    bt.add_argument("--speaker", help="default speaker (custom voice)")
    bt.add_argument("--instruct", help="default instruction")
    bt.add_argument("--voice", help="default voice file (Base checkpoints)")
    bt.add_argument("--num-hosts", type=int, default=None,
                    help="hosts sharing the input (default 1; with --distributed: JAX's count)")
    bt.add_argument("--host-index", type=int, default=None,
                    help="this host's index: it takes requests i, i+N, ... (default 0; with "
                         "--distributed: JAX's process index)")
    bt.add_argument("--no-continuous-batching", dest="continuous", action="store_false",
                    help="padded batches that wait for their longest row, each split over a "
                         "jax.sharding mesh of the local devices (default: rows refill as "
                         "requests end, one engine per device)")
    bt.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() first (a TPU pod slice, SLURM, ... "
                         "are detected; elsewhere give --coordinator, --num-hosts, --host-index) "
                         "and take the host count and index from it")
    bt.add_argument("--coordinator", metavar="HOST:PORT",
                    help="with --distributed: process 0's address, where JAX cannot detect it")
    cl = sub.add_parser("clone", parents=[common, speech, start],
                        help="clone a voice from reference audio (Base checkpoint)")
    cl.add_argument("--ref-audio", help="reference audio: file, URL or base64")
    cl.add_argument("--ref-text", help="transcript of the reference (ICL mode)")
    cl.add_argument("--ref-tail-silence", type=float, default=0.0, metavar="SECONDS",
                    help="silence appended to the reference before its codes are taken (ICL; "
                         "e.g. 0.5 when the reference ends mid-word and its last sound bleeds "
                         "into the speech; default 0, the official)")
    cl.add_argument("--x-vector-only", action="store_true",
                    help="clone from the speaker embedding alone (no transcript needed)")
    cl.add_argument("--voice", help="a voice file written by --save-voice (instead of --ref-audio)")
    cl.add_argument("--save-voice", help="write the encoded reference voice to this file")
    for name in EXTRA_COMMANDS:
        importlib.import_module(name).add_parser(sub, common)
    for parser in [p, *sub.choices.values()]:   # "--text" must not pass for "--text-mode"
        parser.allow_abbrev = False
    return p


def fail(msg: str) -> None:
    print(f"qwen3-tts-jax: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _in_flags(e: Exception) -> str:
    """An error's message with the API's setting names as this command's flags: the API says
    `max_new_tokens must be ...`, the command line `--max-new-tokens must be ...`."""
    msg = str(e)
    param = getattr(e, "param", None)          # api.SettingError names its setting
    if param in SAMPLING_FLAGS and msg.startswith(param):
        msg = "--" + param.replace("_", "-") + msg[len(param):]
    for api_name in ("subtalker_dosample=False", "do_sample=False"):
        msg = msg.replace(api_name, "--greedy")
    return msg


def _check_voice_flags(args) -> None:
    """The flags that pick the voice, checked before the model loads: the API's own errors would
    name its arguments, not these flags."""
    if args.command == "voice-design" and not (args.instruct or "").strip():
        fail('voice-design needs --instruct "DESCRIPTION": the voice in words, e.g. '
             '--instruct "A warm, low female voice, speaking slowly."')
    if args.command == "clone":
        if bool(args.voice) == bool(args.ref_audio):
            fail("give exactly one of --ref-audio (with --ref-text, or --x-vector-only) or "
                 "--voice")
        if args.ref_audio and not args.x_vector_only and not (args.ref_text or "").strip():
            fail("--ref-audio needs --ref-text TRANSCRIPT (the words spoken in it), or "
                 "--x-vector-only to clone from the speaker embedding alone")


def _check_segments(args) -> None:
    from . import segments

    if args.segment_pause is not None and args.segment_chars is None:
        fail("--segment-pause needs --segment-chars N (the text is said in one pass without it)")
    try:
        if args.segment_chars is not None:
            segments.check_max_chars(args.segment_chars)
        segments.check_pause(segments.SEGMENT_PAUSE if args.segment_pause is None
                             else args.segment_pause)
    except ValueError as e:
        fail("--" + str(e).replace("_", "-", 1))


def _kind_mismatch(tts, args) -> str | None:
    """Why the checkpoint does not fit the command (None: it does), naming the command (and its
    voice flags) that fits the checkpoint: checked before generating."""
    need, have = COMMAND_KINDS.get(args.command), tts.tts_model_type
    if need is None or need == have:
        return None
    other = next((c for c, k in COMMAND_KINDS.items() if k == have), None)
    hint = (f": use `qwen3-tts-jax {other} --model {args.model} {VOICE_FLAGS[other]} ...`"
            if other else "")
    return (f"the {args.command} command needs a {KIND_NAMES[need]} checkpoint, but --model "
            f"{args.model} is a {KIND_NAMES.get(have, have)} checkpoint{hint}")


def _check_writable(folder: str, what: str) -> None:
    """Fail unless a file can be created in `folder`. A real try: `os.access` says yes to root,
    and to a folder on a read-only file system."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qwen3-tts-jax-check.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        fail(f"cannot write {what}: {e.strerror or e}")


def _check_output(path: str, audio: bool = True) -> None:
    """Fail before any work if the file cannot be written (folder, permission, audio format)."""
    from .audio import AudioError, format_for_path

    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        fail(f"cannot write {path}: it is a folder")
    if not os.path.isdir(folder):
        fail(f"cannot write {path}: folder {folder} does not exist")
    _check_writable(folder, path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        fail(f"cannot write {path}: permission denied")
    if audio:
        try:
            format_for_path(path)
        except AudioError as e:
            fail(str(e))


def _check_batch(args):
    """The batch command's checks before the model loads: (requests, problems) of INPUT."""
    from . import batch

    if os.path.isdir(args.input):
        fail(f"input {args.input} is a folder, not a file")
    if not os.path.isfile(args.input):
        fail(f"input file {args.input} does not exist")
    if args.batch_size < 1:
        fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        fail(f"--out-dir {args.out_dir} exists and is not a folder")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {args.out_dir}: {e.strerror or e}")
    _check_writable(args.out_dir, f"to --out-dir {args.out_dir}")
    defaults = {k: getattr(args, k) for k in ("speaker", "instruct", "language", "voice")
                if getattr(args, k) is not None}
    try:
        requests, problems = batch.read_requests(args.input, defaults)
    except (OSError, ValueError) as e:
        fail(f"cannot read {args.input}: {e}" if isinstance(e, OSError) else str(e))
    if not requests:
        for p in problems:
            print(f"qwen3-tts-jax: skipping {p}", file=sys.stderr)
        print(f"qwen3-tts-jax: no requests in {args.input}", file=sys.stderr)
        raise SystemExit(1)
    return requests, problems


class _Stages:
    """A small progress display over the pipeline's stages (load, generate, decode)."""

    def __init__(self, quiet: bool):
        from tqdm import tqdm

        self.bar = None if quiet else tqdm(total=3, bar_format="{desc} {bar} {elapsed}",
                                           file=sys.stderr)

    def __call__(self, desc: str):
        if self.bar is not None:
            self.bar.set_description_str(desc.ljust(20))
            self.bar.update(0 if self.bar.n == 0 and desc.startswith("loading") else 1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _clone_voice(tts, args):
    """The reference voice: a saved voice file, or encoded now from --ref-audio (and saved)."""
    from . import load_voice, save_voice

    if args.voice:
        return load_voice(args.voice)
    voice = tts.create_voice_clone_prompt(args.ref_audio, ref_text=args.ref_text,
                                          x_vector_only_mode=args.x_vector_only,
                                          ref_tail_silence=args.ref_tail_silence)
    if args.save_voice:
        try:
            save_voice(voice, args.save_voice)
        except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error
            fail(f"cannot write voice file {args.save_voice}: {e}")
        print(f"saved voice to {args.save_voice}", file=sys.stderr)
    return voice


def _hosts(args) -> None:
    """The batch command's share of the input: --num-hosts/--host-index as given, or from
    `jax.distributed.initialize()` with --distributed (before anything starts a JAX backend)."""
    if args.coordinator and not args.distributed:
        fail("--coordinator needs --distributed")
    if args.distributed:
        import jax

        if args.coordinator and (args.num_hosts is None or args.host_index is None):
            fail("--coordinator needs --num-hosts and --host-index")
        try:
            jax.distributed.initialize(coordinator_address=args.coordinator,
                                       num_processes=args.num_hosts, process_id=args.host_index)
        except (RuntimeError, ValueError) as e:
            fail(f"jax.distributed.initialize() failed: {e} (outside a TPU pod slice or a "
                  "cluster JAX detects, give --coordinator, --num-hosts and --host-index)")
        args.num_hosts, args.host_index = jax.process_count(), jax.process_index()
    args.num_hosts = 1 if args.num_hosts is None else args.num_hosts
    args.host_index = 0 if args.host_index is None else args.host_index
    if args.num_hosts < 1 or not 0 <= args.host_index < args.num_hosts:
        fail(f"--host-index must be in 0..{args.num_hosts - 1} for --num-hosts "
              f"{args.num_hosts}, got {args.host_index}")


def _batch(tts, args, stages, requests, problems) -> int:
    from . import batch
    from .settings import GenerationSettings

    stages.close()
    for p in problems:
        print(f"qwen3-tts-jax: skipping {p}", file=sys.stderr)
    gen = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    if args.greedy:
        gen.update(do_sample=False, subtalker_dosample=False)
    try:        # once here, not once per line: the settings are the same for every request
        GenerationSettings.merge(tts.generate_defaults, **gen)
    except (ValueError, TypeError) as e:
        fail(_in_flags(e))
    if args.text_mode is not None:
        gen["non_streaming_mode"] = args.text_mode == "non-streaming"
    segment_pause = {} if args.segment_pause is None else {"segment_pause": args.segment_pause}
    summary = batch.run(tts, requests, args.out_dir, args.batch_size, gen,
                        progress=not args.quiet, num_hosts=args.num_hosts,
                        host_index=args.host_index, continuous=args.continuous,
                        fmt=args.format, frames_per_token=0.0 if args.max_new_tokens is not None
                        else args.frames_per_token, segment_chars=args.segment_chars,
                        **segment_pause)
    failed = problems + summary["failed"]
    print(f"batch: {summary['done']} written, {summary['skipped']} already there, "
          f"{len(failed)} failed; {summary['audio_seconds']:.1f} s of audio in "
          f"{summary['wall_seconds']:.1f} s")
    for f in failed:
        print(f"  failed: {f}")
    if summary["cut"]:
        print(f"batch: {len(summary['cut'])} written but cut: they reached max_new_tokens "
              "without the end token (a runaway, or a budget too small for the text); delete "
              "them to generate them again (another seed, a larger --max-new-tokens)")
    for c in summary["cut"]:
        print(f"  cut: {c}")
    return 1 if failed else 0


def _interrupted() -> None:
    print("qwen3-tts-jax: interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)                # not SystemExit: a worker may be inside XLA, holding locks


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line of the command's own voice (`qwen3-tts-jax: warning: ...`), not
    Python's file and line: the CLI's users did not write that code."""
    print(f"qwen3-tts-jax: warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:
        _interrupted()
    logging.basicConfig(level=logging.WARNING, format="qwen3-tts-jax: %(message)s")
    warnings.showwarning = _show_warning
    if getattr(args, "run", None) is not None:        # serve, finetune: their own Ctrl-C
        return args.run(args)
    # The speech commands run in a worker thread: Python sees Ctrl-C only in the main thread and
    # only between bytecodes, so while a compiled program runs (a whole utterance, a padded batch)
    # it would wait for the program to end. The main thread waits here instead and ends the
    # process at once; finished files stay (each is written atomically: temp file + rename).
    outcome = {}

    def work():
        try:
            outcome["rc"] = _main(args)
        except BaseException as e:  # noqa: BLE001 - SystemExit from fail included
            outcome["raised"] = e

    worker = threading.Thread(target=work, name="qwen3-tts-jax", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        _interrupted()
    if "raised" in outcome:
        raise outcome["raised"]
    return outcome["rc"]


def _main(args) -> int:
    listing = args.command != "batch" and (args.list_speakers or args.list_languages)
    if args.command == "batch":
        from .audio import output_formats

        if args.format not in output_formats():
            fail(f"--format {args.format}: this libsndfile cannot write it (choose one of "
                  f"{', '.join(output_formats())})")
    elif not listing:
        if (args.text is None) == (args.text_file is None):
            fail("give exactly one of --text or --text-file")
        _check_output(args.output)
        if getattr(args, "save_voice", None):
            _check_output(args.save_voice, audio=False)
        if args.text_file:
            from .batch import read_text

            try:
                args.text = read_text(args.text_file).strip()
            except IsADirectoryError:
                fail(f"cannot read --text-file {args.text_file}: it is a folder")
            except (OSError, ValueError) as e:
                fail(f"cannot read --text-file: {e}")
        if not args.text.strip():
            fail("--text-file has no text" if args.text_file else "--text is empty")
        _check_voice_flags(args)
    if not listing:
        _check_segments(args)
    if bool(args.model) == bool(args.random_weights):
        fail("give --model PATH_OR_HUB_ID, or --random-weights for the offline check")
    if args.command == "batch":
        requests, problems = _check_batch(args)
        _hosts(args)

    from . import Qwen3TTS, demo, enable_compilation_cache  # late: `--help` stays instant

    programs = None
    if not args.no_compile_cache:
        xla = enable_compilation_cache()
        programs = xla and os.path.join(os.path.dirname(xla), "programs")

    stages = _Stages(args.quiet or listing)
    t0 = time.perf_counter()
    stages("loading model")
    if args.random_weights:
        print("qwen3-tts-jax: --random-weights: building a tiny RANDOM-WEIGHT checkpoint; the "
              "output is NOISE, not speech (it proves the install works end to end)",
              file=sys.stderr)
        folder = demo.build(os.path.join(tempfile.mkdtemp(prefix="qwen3-tts-jax-demo-"), "ckpt"),
                            kind=COMMAND_KINDS.get(args.command, "custom_voice"))
    else:
        folder = args.model
    try:
        import jax.numpy as jnp

        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
        tts = Qwen3TTS.from_pretrained(folder, dtype=dtype, model_parallel=args.model_parallel,
                                       quantize=args.quantize, adapters=args.adapter,
                                       weights_cache=args.weights_cache,
                                       compile_cache=programs,
                                       codec_precision=args.codec_precision)
        if not listing:
            _ = tts.speech_tokenizer   # the codec now: a broken one fails before generating
    except (FileNotFoundError, ValueError) as e:
        stages.close()
        fail(str(e))
    unfit = None if listing else _kind_mismatch(tts, args)
    if not unfit and args.command == "custom-voice" and not listing and not args.speaker:
        unfit = ("custom-voice needs --speaker NAME; this checkpoint has: "
                 f"{', '.join(tts.get_supported_speakers())}")
    if unfit:
        stages.close()
        fail(unfit)
    if listing:
        if args.list_speakers:
            print("\n".join(tts.get_supported_speakers())
                  or "(this checkpoint has no preset speakers)")
        if args.list_languages:
            print("\n".join(tts.get_supported_languages()))
        return 0

    if args.command == "batch":
        return _batch(tts, args, stages, requests, problems)
    from . import segments

    # a long text in segments, rows of one batch (what `generate_*(segment_chars=N)` does)
    texts = segments.split(args.text, args.segment_chars) if args.segment_chars else [args.text]
    gen = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    if args.max_new_tokens is None and args.frames_per_token:
        gen["max_new_tokens"] = [min(tts.generate_defaults.max_new_tokens, text_budget(
            len(tts.tokenizer.encode(t)), args.frames_per_token)) for t in texts]
    mode = {} if args.text_mode is None else {
        "non_streaming_mode": args.text_mode == "non-streaming"}
    if args.greedy:
        gen.update(do_sample=False, subtalker_dosample=False)
    stages("generating")
    t1 = time.perf_counter()
    try:
        if args.command == "custom-voice":
            codes = tts.generate_custom_voice_codes(
                texts, speaker=args.speaker, language=args.language, instruct=args.instruct,
                **mode, **gen)
        elif args.command == "voice-design":
            codes = tts.generate_voice_design_codes(
                texts, instruct=args.instruct, language=args.language, **mode, **gen)
        else:
            voice = _clone_voice(tts, args)
            codes = tts.generate_voice_clone_codes(texts, language=args.language,
                                                   voice_clone_prompt=voice, **mode, **gen)
        stages("decoding audio")
        if args.command == "clone":
            wavs, sr = tts.decode_voice_clone(codes, voice)
        else:
            wavs, sr = tts.decode(codes)
    except (ValueError, TypeError, FileNotFoundError) as e:  # AudioError is a ValueError
        stages.close()
        fail(_in_flags(e))
    pause = segments.SEGMENT_PAUSE if args.segment_pause is None else args.segment_pause
    wavs = segments.join(wavs, [0] * len(wavs), 1, round(pause * sr))
    from .audio import write_audio

    try:
        write_audio(args.output, wavs[0], sr)
    except OSError as e:                               # the disk filled up, ...
        stages.close()
        fail(f"cannot write {args.output}: {e}")
    stages("done")
    stages.close()
    t2 = time.perf_counter()
    seconds = len(wavs[0]) / sr
    frames = sum(len(c) for c in codes)
    parts = f", {len(codes)} segments" if len(codes) > 1 else ""
    print(f"wrote {args.output}: {seconds:.2f} s of audio ({frames} frames{parts}) in "
          f"{t2 - t1:.2f} s ({seconds / max(t2 - t1, 1e-9):.2f}x real time; "
          f"{t2 - t0:.2f} s with loading)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
