"""Offline generation of built prompts on one loaded model: the batch padded to its shape buckets,
placed on the devices, run by `generate.generate` (or chunk by chunk by `generate.stream`), the
codes read back. The API and the batch tool's padded batches run here; the batching engine
(`engine.py`) serves requests that arrive over time.

`model` is a loaded `Qwen3TTS` (its `config`, `params`, `model_parallel`, `speech_tokenizer`)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import audio, generate as gen, prompts, speaker_encoder
from .buckets import batch_rows, ladder
from .config import Qwen3TTSConfig
from .options import Options
from .budget import warn_budget_reached
from .settings import GenerationSettings, as_list, keys, traced
from .voice import VoiceClonePromptItem


def check_chunks(chunk_frames, first_chunk_frames) -> None:
    for name, v in (("chunk_frames", chunk_frames), ("first_chunk_frames", first_chunk_frames)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1 (frames of 80 ms), got {v!r}")


def prepare(cfg: Qwen3TTSConfig, options: Options, items: list[prompts.Prompt],
            settings: GenerationSettings, data_parallel: int = 1, first_row: int = 0):
    """Built prompts -> (PromptBatch, generate.Settings, keys) padded to shape buckets: the batch
    to a power of two, at least `options.min_rows` (extra rows stop at once) and a multiple of
    `data_parallel`; prompt and trailing text to the ladder. `first_row`: the items are a call's
    rows from there on (their keys continue an int seed's)."""
    n = len(items)
    longest = max(len(p) for p in items)
    # A text longer than the model's positions is refused; generation may run past them, as in
    # the official code (RoPE has no table to run out of; max_new_tokens bounds it).
    limit = cfg.talker.max_position_embeddings
    if longest > limit:
        raise ValueError(f"the prompt is {longest} tokens, more than the model's {limit} "
                         "positions; split the text")
    B = batch_rows(n, options.min_rows)
    B = -(-B // data_parallel) * data_parallel   # every device gets the same number of rows
    items = items + [items[0]] * (B - n)
    # Prompt lengths on the finer 16, 24, 32, 48, ... ladder: prefill is most of the time to the
    # first frame, and a power of two could nearly double it.
    batch = prompts.batch_prompts(cfg, items, length=ladder(longest),
                                  trailing_length=ladder(max(len(p.trailing) for p in items)))
    rows = [settings.row(i, n) for i in range(n)]       # each its own budget
    return (batch, traced(rows + [None] * (B - n), options),
            keys(settings.seed, n, B, first_row))


def _executables(model):
    """The model's serialized-programs cache (`compilation_cache.Executables`), or None."""
    return getattr(model, "executables", None) if model.model_parallel == 1 else None


def run(model, items: list[prompts.Prompt], settings: GenerationSettings,
        data_parallel: bool = False) -> list[np.ndarray]:
    """Codes (frames, 16) of built prompts: one padded, bucketed batch on device, or with
    `data_parallel` the batch split over all local devices (params replicated). More prompts
    than `model.max_batch_rows` (per device) run as batches of that many in turn, each row with
    the key and budget it has in the whole call: the same codes, in bounded memory."""
    m = model.model_parallel
    devices = len(jax.local_devices()) // m if (data_parallel or m > 1) else 1
    n = len(items)
    most = max(1, getattr(model, "max_batch_rows", None) or n) * devices
    codes, cut, frames = [], [], []
    for start in range(0, n, most):
        stop = min(n, start + most)
        part, state = _run_rows(model, items[start:stop], settings.rows(start, stop, n), devices,
                                start)
        codes += part
        cut += [start + b for b in state[0]]
        frames += state[1]
    budgets = settings.budgets(n)
    warn_budget_reached(cut, frames, n, [budgets[b] for b in cut], stacklevel=4)
    return codes


def _run_rows(model, items, settings, devices: int, first_row: int):
    """One padded batch of `run`: (codes, (the rows cut at their budget, their frames))."""
    from .sharding import data_sharding

    m = model.model_parallel
    batch, run_settings, ks = prepare(model.config, model.options, items, settings, devices,
                                      first_row)
    params, mesh = model.params, None
    if m > 1:                      # params already split over the mesh's "model" axis
        rows, _ = data_sharding(m)
        batch, run_settings, ks = jax.device_put((batch, run_settings, ks), rows)
    elif devices > 1:              # the frame loop per device on its rows (`generate.decode`)
        rows, _ = data_sharding()
        batch, run_settings, ks = jax.device_put((batch, run_settings, ks), rows)
        params, mesh = model.replicated_params(), rows.mesh
    state = gen.generate(params, model.config, batch, run_settings, ks,
                         max_frames=settings.most_new_tokens - 1, options=model.options,
                         executables=_executables(model) if m == 1 and devices == 1 else None,
                         mesh=mesh)
    codes = np.asarray(state.codes_BxFxG)
    lengths = np.asarray(state.length_B)
    n = len(items)
    cut = np.flatnonzero(gen.budget_reached(state, model.config)[:n])
    return [codes[b, :lengths[b]] for b in range(n)], (cut.tolist(), lengths[cut].tolist())


def warmup(model, items: list[prompts.Prompt], batch_sizes, settings: GenerationSettings) -> float:
    """Compile the programs that batches of these prompts use, for each batch size: the exact
    shapes `run` gives (prompt and text buckets, padded batch, first KV-cache segment), by
    running the prefill at each of its compute lengths in the prompt bucket
    (`generate.prefill_lengths`) and one frame. Returns seconds."""
    t = time.perf_counter()
    options = model.options
    settings = dataclasses.replace(settings, max_new_tokens=settings.most_new_tokens)
    capacity = gen.capacity(settings.max_new_tokens - 1, options)
    for B in batch_sizes:
        rows = (list(items) * B)[:B]
        batch, run_settings, ks = prepare(model.config, options, rows, settings)
        for compute in gen.prefill_lengths(batch.text_BxL.shape[1]):
            state, ctx = gen.prefill(model.params, model.config, batch, run_settings, ks,
                                     frames=capacity, compute=compute, options=options)
        jax.block_until_ready(gen.decode(model.params, model.config, state, ctx, run_settings,
                                         1, options).step)
    return time.perf_counter() - t


def stream(model, item: prompts.Prompt, settings: GenerationSettings, chunk_frames: int,
           first_chunk_frames: int, ref_code=None, row: int = 0):
    """Float32 audio chunks of one utterance while it is generated (`generate.stream`'s code
    chunks through a `StreamDecoder`, which carries the codec's state between chunks: the chunks
    concatenate to the offline audio, and each costs only its new frames). An ICL reference
    (`ref_code`) is decoded first and its audio cut. After the first chunk, a chunk's codec runs
    beside the next chunk's frames as `Options.codec_overlap` says (same audio). `row`: sample
    as row `row` of a batch with the same int seed (a long text's later segments, `segments.py`)."""
    settings = settings.row(0, 1)
    batch, run_settings, ks = prepare(model.config, model.options, [item], settings)
    if row:
        ks = jnp.broadcast_to(keys(settings.seed, row + 1, row + 1)[row], ks.shape)
    codec = model.speech_tokenizer.stream_decoder()
    codec.reset(0, prefix=ref_code)
    chunks = gen.Chunks(model.params, model.config, batch, run_settings, ks,
                        max_frames=settings.max_new_tokens - 1, chunk_frames=chunk_frames,
                        first_chunk_frames=first_chunk_frames, options=model.options,
                        executables=_executables(model))
    overlap = model.options.codec_overlap
    worker = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="codec")
              if overlap == "thread" else None)
    try:
        more, first = chunks.dispatch(), True
        while more:
            new = chunks.collect()
            if new is None:
                more = chunks.dispatch()
                continue
            # the next chunk's frames run while this chunk's codec does (not for the first
            # chunk: its audio is the time to first audio): `Options.codec_overlap`
            ahead = overlap != "off" and not first
            if ahead and worker is not None:
                audio = worker.submit(codec.push, [new[0]])
            else:
                audio = codec.submit([new[0]])
            if ahead:
                more = chunks.dispatch()
            audio = audio.result()[0]
            yield audio
            first = False
            if not ahead:
                more = chunks.dispatch()
        if bool(gen.budget_reached(chunks.state, model.config)[0]):
            warn_budget_reached([0], [int(chunks.state.length_B[0])], 1, settings.max_new_tokens)
    finally:
        if worker is not None:
            worker.shutdown(wait=True)


def encode_voices(model, ref_audio, ref_text=None, x_vector_only_mode=False,
                  ref_tail_silence: float = 0.0) -> list[VoiceClonePromptItem]:
    """Reference voice(s) encoded once (`Qwen3TTS.create_voice_clone_prompt`): the x-vector
    (speaker encoder) and, in ICL mode, the reference codes (codec encoder) with the transcript,
    `ref_tail_silence` seconds of silence appended before the codes are taken."""
    if (isinstance(ref_tail_silence, bool) or not isinstance(ref_tail_silence, (int, float))
            or not 0 <= ref_tail_silence <= 5):
        raise ValueError(f"ref_tail_silence must be seconds in [0, 5], got {ref_tail_silence!r}")
    audios = [os.fspath(a) if isinstance(a, os.PathLike) else a
              for a in (ref_audio if isinstance(ref_audio, list) else [ref_audio])]
    n = len(audios)
    texts = as_list(ref_text, n, "ref_text")
    xvec_only = as_list(x_vector_only_mode, n, "x_vector_only_mode")
    for i, (t, x) in enumerate(zip(texts, xvec_only)):
        if not x and (t is None or not str(t).strip()):
            raise ValueError(f"ref_text[{i}] is required in ICL mode (x_vector_only_mode="
                             "False): pass the transcript of the reference audio, or "
                             "x_vector_only_mode=True to clone from the x-vector alone")
    enc_cfg = model.config.speaker_encoder
    loaded = [audio.load_audio(a) for a in audios]
    rates = {sr for _, sr in loaded}
    codes = [None] * n
    if not all(xvec_only):
        padded = [np.concatenate([w, np.zeros(int(round(ref_tail_silence * sr)), w.dtype)])
                  for w, sr in loaded]
        # Like the official: one padded batch when the rates agree (the last frame of a
        # shorter item depends on the batch width, so batching matters), else one by one.
        if len(rates) == 1:
            codes = model.speech_tokenizer.encode(padded, sr=rates.pop())
        else:
            codes = [model.speech_tokenizer.encode((w, sr))[0]
                     for w, (_, sr) in zip(padded, loaded)]
    items = []
    for (wave, sr), code, text, x in zip(loaded, codes, texts, xvec_only):
        wave24 = wave if sr == enc_cfg.sample_rate else audio.resample(
            wave, sr, enc_cfg.sample_rate)
        xvec = np.asarray(speaker_encoder.extract_xvector(model.params["speaker_encoder"],
                                                          enc_cfg, wave24), np.float32)
        items.append(VoiceClonePromptItem(None if x else code, xvec, bool(x), not x, text))
    return items
