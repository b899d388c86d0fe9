"""`qwen3-tts-jax serve`: an HTTP server with OpenAI's speech API, dynamic batching and streaming.

    qwen3-tts-jax serve --model Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice --port 8000
    # then open http://127.0.0.1:8000/ in a browser: the playground
    curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \\
        -d '{"model": "qwen3-tts", "input": "Hello.", "voice": "ryan", "response_format": "wav"}' \\
        -o hello.wav

Modules: `engine` (the batching worker, no web framework), `app` (FastAPI routes, streams,
batches), `speech` (a speech request checked and its jobs built), `sessions` (the WebSocket text
sessions), `voices` (cloned voices: the store, the upload), `wire` (audio formats, bodies read
with limits), `guards` (API key, browser origins, CORS), `errors` (OpenAI's error shape),
`metrics` (GET /metrics, Prometheus' format). FastAPI,
uvicorn, python-multipart, websockets and prometheus-client are the optional extra
`pip install "qwen3-tts-jax[serve]"`; nothing else in the package imports them. Details and
measurements: docs/serving.md.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile


def add_parser(sub, common) -> None:
    """The `serve` subcommand (cli.EXTRA_COMMANDS)."""
    import copy

    # serve's --random-weights takes the checkpoint type (the speech commands build the one they
    # need): "resolve" replaces the common flag, on a copy (it edits the parent's actions)
    p = sub.add_parser("serve", parents=[copy.deepcopy(common)], conflict_handler="resolve",
                       help="an HTTP server: OpenAI's POST /v1/audio/speech, batched and streamed, "
                            "and a playground page at /")
    p.add_argument_group("offline check").add_argument(
        "--random-weights", nargs="?", const="custom_voice", default=None, metavar="TYPE",
        choices=("custom_voice", "voice_design", "base"),
        help="OFFLINE CHECK: serve a tiny random-weight checkpoint (the audio is noise) of TYPE: "
             "custom_voice (default), voice_design or base (with a speaker encoder: register "
             "voices and clone them)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", default="qwen3-tts",
                   help="the model id that GET /v1/models reports")
    s.add_argument("--voices-dir", default="voices",
                   help="cloned voices registered over HTTP are kept here and reloaded at start "
                        "(Base checkpoints)")
    s.add_argument("--max-batch-size", type=int, default=8,
                   help="requests generated together in one padded batch")
    s.add_argument("--batch-buckets", default=None,
                   help="padded batch sizes to compile, comma-separated (default: powers of two up "
                        "to --max-batch-size; one value pads every batch to it: one compile)")
    s.add_argument("--warmup", nargs="?", const="1", default=None, metavar="TOKENS",
                   help="compile before listening: every batch bucket at the prompt buckets of "
                        "these prompt lengths in tokens (comma-separated; a prompt is about 10 "
                        "tokens plus the text's; bare: the smallest bucket). Without it the first "
                        "request of each shape compiles")
    s.add_argument("--warmup-whole-file", action="store_true",
                   help="with --warmup: also compile the codec windows that whole-file formats "
                        "(flac, mp3, opus; wav and pcm stream) decode with, up to the longest "
                        "utterance (--max-new-tokens plus a registered voice's reference)")
    s.add_argument("--min-prompt-bucket", type=int, default=16,
                   help="shortest padded prompt length (larger: fewer compiled shapes)")
    s.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="a batch starts once no request arrived for this long (at most 10x)")
    s.add_argument("--no-continuous-batching", dest="continuous_batching", action="store_false",
                   help="do not start waiting requests in a running batch's free rows: they wait "
                        "for the next batch (for comparison; the default refills rows)")
    s.add_argument("--devices", type=int, default=None, metavar="N",
                   help="local devices to serve on, one batching engine (and a copy of the "
                        "weights) each; requests go to the least busy (default: all)")
    s.add_argument("--api-key", default=os.environ.get("QWEN3_TTS_JAX_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every path but /health (default: "
                        "the QWEN3_TTS_JAX_API_KEY environment variable, which keeps the key out "
                        "of the process list; unset: no authentication; an empty key is an error)")
    s.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                   help="comma-separated web origins (scheme://host[:port], or *) whose pages may "
                        "open the WebSocket, POST non-JSON bodies and call the API with fetch "
                        "(CORS); others are refused (default: none but the server's own)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="waiting requests beyond this are refused with 429")
    s.add_argument("--max-input-chars", type=int, default=4096,
                   help="longer `input` texts are refused with 413")
    s.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take, queue included (then 504 or the stream ends)")
    s.add_argument("--chunk-frames", type=int, default=12,
                   help="frames per streamed chunk (12 frames = 0.96 s of audio)")
    s.add_argument("--first-chunk-frames", type=int, default=3,
                   help="frames in the first chunk (small: the time to first audio)")
    s.add_argument("--admit-frames", type=int, default=None,
                   help="a request arriving while a batch with a free row runs starts within "
                        "this many frames (default: --first-chunk-frames; 0: at the next chunk)")
    s.add_argument("--chunk-ramp", action="store_true",
                   help="a stream's chunks grow from its first (doubling up to --chunk-frames), "
                        "none longer than the audio already sent: no gap where frames come at "
                        "least twice real time, whatever the first chunk's size")
    f = p.add_argument_group("limits and faults")
    f.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longer prompts (input, instructions and a voice's reference together, "
                        "in tokens) are refused with 413 (default: the longest whose largest "
                        "batch fits half the device's free memory; docs/serving.md)")
    f.add_argument("--max-voices", type=int, default=1000, metavar="N",
                   help="registered (cloned) voices kept; registering one more is a 409 until "
                        "one is deleted")
    f.add_argument("--max-batch-items", type=int, default=32, metavar="N",
                   help="items in one POST /v1/audio/speech/batch; more get a 413")
    f.add_argument("--max-sessions", type=int, default=16,
                   help="WebSocket text sessions open at once; more get a 429 error message")
    f.add_argument("--session-idle-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a text session with no message for this long is closed with an error")
    f.add_argument("--stall-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="GET /health answers 503 when the engine made no progress for this long "
                        "with requests in hand")
    f.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or SIGINT, requests in flight get this long to finish; then "
                        "the server stops")
    p.set_defaults(run=run)


def _check_listen(host: str, port: int, fail) -> None:
    """Fail before the model loads (and warms up: minutes) if uvicorn could not listen there: a
    port out of range, an address this machine does not have, a port in use."""
    import socket

    if not 0 <= port <= 65535:
        fail(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            fail(f"cannot listen on {host}:{port}: {e.strerror or e}")


def run(args) -> int:
    from ..cli import SAMPLING_FLAGS, fail

    try:
        import uvicorn

        from .app import ServerOptions, create_app
    except ImportError as e:
        fail(f"serve needs FastAPI, uvicorn and prometheus-client ({e}): "
             "pip install \"qwen3-tts-jax[serve]\"")
    if bool(args.model) == bool(args.random_weights):
        fail("give --model PATH_OR_HUB_ID, or --random-weights for the offline check")
    _check_listen(args.host, args.port, fail)
    if getattr(args, "model_parallel", 1) > 1:
        fail("serve runs a whole copy of the model on each device (--devices); --model-parallel "
              "is not supported by the server yet")
    warmup = ()
    if args.warmup:
        try:
            warmup = tuple(int(n) for n in args.warmup.split(","))
        except ValueError:
            warmup = (0,)
        if min(warmup) < 1:
            fail(f"--warmup takes comma-separated prompt lengths >= 1, got {args.warmup!r}")
    if args.api_key is not None and not args.api_key.strip():
        fail("the API key is empty (--api-key or QWEN3_TTS_JAX_API_KEY): give a key, or leave "
             "both unset for no authentication")
    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    try:
        from .guards import parse_origins

        parse_origins(origins)
    except ValueError as e:
        fail(f"--allowed-origins: {e}")
    for flag, value in (("--max-sessions", args.max_sessions),
                        ("--max-batch-items", args.max_batch_items),
                        ("--max-voices", args.max_voices),
                        ("--session-idle-timeout", args.session_idle_timeout),
                        ("--stall-timeout", args.stall_timeout),
                        ("--max-prompt-tokens", args.max_prompt_tokens or 1)):
        if not value > 0:
            fail(f"{flag} must be > 0, got {value}")
    if args.shutdown_timeout < 0:
        fail(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    from .. import segments

    try:
        if args.segment_chars is not None:
            segments.check_max_chars(args.segment_chars)
        if args.segment_pause is not None:
            segments.check_pause(args.segment_pause)
    except ValueError as e:
        fail("--" + str(e).replace("_", "-", 1))
    if args.warmup_whole_file and not warmup:
        fail("--warmup-whole-file needs --warmup (it warms the whole-file decode on top)")
    logging.basicConfig(level=logging.INFO, format="qwen3-tts-jax: %(message)s")

    import jax.numpy as jnp

    from .. import Qwen3TTS, demo, enable_compilation_cache

    if not args.no_compile_cache:
        enable_compilation_cache()
    folder = args.model
    if args.random_weights:
        print("qwen3-tts-jax: --random-weights: a tiny RANDOM-WEIGHT checkpoint; the audio is "
              "NOISE, not speech", file=sys.stderr)
        folder = demo.build(os.path.join(tempfile.mkdtemp(prefix="qwen3-tts-jax-demo-"), "ckpt"),
                            kind=args.random_weights)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
    try:
        tts = Qwen3TTS.from_pretrained(folder, dtype=dtype, quantize=args.quantize,
                                       adapters=args.adapter,
                                       codec_precision=args.codec_precision)
        _ = tts.speech_tokenizer       # the codec now: a broken one fails before listening
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    buckets = None
    if args.batch_buckets:
        try:
            buckets = tuple(int(b) for b in args.batch_buckets.split(","))
        except ValueError:
            fail(f"--batch-buckets takes comma-separated integers, got {args.batch_buckets!r}")
    defaults = {k: getattr(args, k) for k in SAMPLING_FLAGS
                if k != "max_new_tokens" and getattr(args, k) is not None}
    if args.greedy:
        defaults.update(do_sample=False, subtalker_dosample=False)
    options = ServerOptions(
        model_name=args.model_name, voices_dir=args.voices_dir,
        max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue, max_input_chars=args.max_input_chars,
        request_timeout=args.request_timeout, chunk_frames=args.chunk_frames,
        first_chunk_frames=args.first_chunk_frames, admit_frames=args.admit_frames,
        chunk_ramp=args.chunk_ramp,
        batch_buckets=buckets, min_prompt_bucket=args.min_prompt_bucket,
        language=args.language,
        non_streaming_mode=None if args.text_mode is None else args.text_mode == "non-streaming",
        defaults=defaults, max_new_tokens=args.max_new_tokens,
        frames_per_token=args.frames_per_token, warmup=warmup,
        warmup_whole_file=args.warmup_whole_file,
        continuous_batching=args.continuous_batching, devices=args.devices,
        api_key=args.api_key, allowed_origins=origins, max_prompt_tokens=args.max_prompt_tokens,
        max_sessions=args.max_sessions, session_idle_timeout=args.session_idle_timeout,
        stall_timeout=args.stall_timeout, max_batch_items=args.max_batch_items,
        max_voices=args.max_voices, segment_chars=args.segment_chars,
        **({} if args.segment_pause is None else {"segment_pause": args.segment_pause}))
    try:
        app = create_app(tts, options)
    except ValueError as e:
        fail(str(e))
    # SIGTERM / SIGINT: uvicorn stops listening and lets requests in flight finish for
    # --shutdown-timeout seconds, then cancels them; the engine then stops (engine.stop)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
