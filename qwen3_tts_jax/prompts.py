"""Talker prompts exactly as the official `Qwen3TTSForConditionalGeneration.generate` builds them.

A prompt is described by ids, not embeddings, so that one jitted function (`embed_prompts`) embeds a
whole padded batch: every position has an optional text id (its embedding is
text_projection(text_embedding(id)); tts_pad/bos/eos are text ids too), an optional codec part (up to
16 codes, group 0 embedded by the talker's codec_embedding and group g>0 by the predictor's table
g-1: control ids and speakers are group-0 ids, an ICL reference frame uses all 16) and an optional
extra vector (the x-vector of a cloned voice). The embedding of a position is the sum of its parts.

Layout (rows = positions; T = text part, C = codec part; see shared NOTES.md section 6):
    [instruct]    T(each token of "<|im_start|>user\\n{instruct}<|im_end|>\\n")
    role          T(first 3 tokens: "<|im_start|>assistant\\n")
    codec prefix  (pad, think|nothink) (pad, think_bos) [(pad, lang)] (pad, think_eos) [(pad, spk)]
                  (bos, codec_pad)
    streaming     (first text token, codec_bos); trailing text = rest of text + eos
    non-streaming (t, codec_pad) for every text token, (eos, codec_pad), (pad, codec_bos);
                  trailing text = pad
    ICL clone     instead of the two above, text_seq = ref text + text + eos against
                  codec_seq = codec_bos + reference frames: non-streaming (text_seq_i, codec_pad)
                  then (pad, codec_seq_j); streaming the two summed position-wise, the longer
                  text going to the trailing text (`_icl_rows`)

Request-independent prefix (`Prompt.prefix_len`, what `prefix_cache.PrefixCache` reuses): the
leading positions whose ids do not depend on the text to speak. For an ICL clone that is
[instruct] + role + codec prefix (language id, x-vector) + the first len(ref text) ICL rows: in
both text modes those rows hold the reference transcript's tokens (streaming: summed with
codec_bos and the first reference frames), and every later row holds the target text (or, in
non-streaming mode, sits after it), so its KV depends on the request. The reference frames past
the transcript's length are therefore prefilled per request: the official layout sums the
request's text into them. At least the last position is always left to compute (its logits give
the first code). Other prompts have prefix_len 0: their request-independent part is the role and
codec prefix, at most 10 positions, which saves less than a cache lookup and a stored KV cost.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, NamedTuple

import numpy as np

from . import text as text_mod
from .config import Qwen3TTSConfig
from .generate import NONE
from .settings import as_list
from .voice import VoiceClonePromptItem, check_items

log = logging.getLogger("qwen3_tts_jax")



@dataclasses.dataclass
class Prompt:
    """One item's prompt as ids (host side)."""
    text_L: np.ndarray                 # int32 (L,), NONE where the position has no text part
    codec_LxG: np.ndarray              # int32 (L, 16), NONE where absent; group 0 = talker ids
    trailing: np.ndarray               # int32 (Lt,) text ids fed one per frame after the prompt
    extra_pos: int = NONE              # position of the x-vector (cloned voice), if any
    extra: np.ndarray | None = None    # (D,) float32
    prefix_len: int = 0                # leading positions independent of the text (module doc)

    def __len__(self):
        return len(self.text_L)


def _rows(text, codec_groups=16):
    text = np.asarray(text, np.int32)
    return text, np.full((len(text), codec_groups), NONE, np.int32)


def resolve_language(cfg: Qwen3TTSConfig, language: str, speaker: str | None):
    """The language codec id (None for "auto"), with the dialect override of dialect speakers
    (applies for "chinese" and "auto" only, like the official code)."""
    t = cfg.talker
    lang = language.lower()
    lang_id = None if lang == "auto" else {k.lower(): v for k, v in t.codec_language_id.items()}[lang]
    if speaker and lang in ("chinese", "auto"):
        dialect = {k.lower(): v for k, v in t.spk_is_dialect.items()}.get(speaker.lower(), False)
        if dialect:
            lang_id = t.codec_language_id[dialect]
    return lang_id


def build_prompt(cfg: Qwen3TTSConfig, input_ids: list[int], language: str,
                 speaker: str | None = None, instruct_ids: list[int] | None = None,
                 non_streaming_mode: bool = True, xvector: np.ndarray | None = None,
                 ref_ids: list[int] | None = None, ref_code: np.ndarray | None = None) -> Prompt:
    """A custom-voice / voice-design / voice-clone prompt.

    input_ids: tokens of "<|im_start|>assistant\\n{text}<|im_end|>\\n<|im_start|>assistant\\n".
    speaker: a preset speaker name (custom voice); xvector: a speaker-encoder vector (clone).
    ref_ids + ref_code: the ICL reference (tokens of "<|im_start|>assistant\\n{ref_text}<|im_end|>\\n"
    and its (T, 16) codes), which replaces the text rows with the official ICL layout.
    """
    t = cfg.talker
    G = t.num_code_groups
    pad, bos, eos = cfg.tts_pad_token_id, cfg.tts_bos_token_id, cfg.tts_eos_token_id
    ids = np.asarray(input_ids, np.int32)
    lang_id = resolve_language(cfg, language, speaker)
    ctrl = ([t.codec_nothink_id, t.codec_think_bos_id, t.codec_think_eos_id] if lang_id is None else
            [t.codec_think_id, t.codec_think_bos_id, lang_id, t.codec_think_eos_id])
    spk = None
    if speaker:
        spk = {k.lower(): v for k, v in t.spk_id.items()}[speaker.lower()]
    codec = ctrl + ([NONE if spk is None else spk] if (spk is not None or xvector is not None)
                    else []) + [t.codec_pad_id, t.codec_bos_id]

    parts_text, parts_codec = [], []
    if instruct_ids is not None:
        a, c = _rows(instruct_ids, G)
        parts_text.append(a)
        parts_codec.append(c)
    a, c = _rows(ids[:3], G)
    parts_text.append(a)
    parts_codec.append(c)
    # codec prefix: all but the last codec id; text pad..., bos on the last of these rows
    n = len(codec) - 1
    prefix_start = sum(len(p) for p in parts_text)
    a, c = _rows([pad] * (n - 1) + [bos], G)
    c[:, 0] = codec[:-1]
    parts_text.append(a)
    parts_codec.append(c)
    extra_pos = NONE if xvector is None else prefix_start + len(ctrl)
    text = ids[3:-5]
    prefix_len = 0
    if ref_code is not None:
        ref_text = np.asarray(ref_ids, np.int32)[3:-2]
        a, c, trailing = _icl_rows(cfg, ref_text, text, np.asarray(ref_code, np.int32),
                                   non_streaming_mode)
        # the rows before the target text enters (streaming: at most the ICL rows there are)
        prefix_len = sum(len(p) for p in parts_text) + min(len(ref_text), len(a))
    elif non_streaming_mode:
        a, c = _rows(list(text) + [eos, pad], G)
        c[:, 0] = [t.codec_pad_id] * (len(text) + 1) + [t.codec_bos_id]
        trailing = np.asarray([pad], np.int32)
    else:
        a, c = _rows(ids[3:4], G)
        c[:, 0] = t.codec_bos_id
        trailing = np.asarray(list(ids[4:-5]) + [eos], np.int32)
    parts_text.append(a)
    parts_codec.append(c)
    text_L = np.concatenate(parts_text)
    return Prompt(text_L, np.concatenate(parts_codec), trailing, extra_pos,
                  None if xvector is None else np.asarray(xvector, np.float32),
                  min(prefix_len, len(text_L) - 1))


def _icl_rows(cfg: Qwen3TTSConfig, ref_text, text, ref_code_TxG, non_streaming_mode: bool):
    """The official `generate_icl_prompt`: reference text + text + eos against codec_bos + the
    reference frames (all 16 codebooks summed)."""
    t, G = cfg.talker, cfg.talker.num_code_groups
    pad, eos = cfg.tts_pad_token_id, cfg.tts_eos_token_id
    text_seq = np.concatenate([ref_text, text, [eos]]).astype(np.int32)
    codec_seq = np.concatenate([np.full((1, G), NONE, np.int32), ref_code_TxG])
    codec_seq[0, 0] = t.codec_bos_id
    Lt, Lc = len(text_seq), len(codec_seq)
    if non_streaming_mode:
        a = np.concatenate([text_seq, np.full(Lc, pad, np.int32)])
        c = np.concatenate([np.full((Lt, G), NONE, np.int32), codec_seq])
        c[:Lt, 0] = t.codec_pad_id
        return a, c, np.asarray([pad], np.int32)
    if Lt > Lc:
        return text_seq[:Lc], codec_seq, text_seq[Lc:]
    return np.concatenate([text_seq, np.full(Lc - Lt, pad, np.int32)]), codec_seq, \
        np.asarray([pad], np.int32)


class PromptBatch(NamedTuple):
    """Prompts left-padded to a common length L (pads have no parts and mask 0); trailing text
    right-padded with tts_pad to Lt. A pytree of arrays (host numpy until put on device)."""
    text_BxL: np.ndarray
    codec_BxLxG: np.ndarray
    mask_BxL: np.ndarray        # bool, False on left padding
    extra_BxD: np.ndarray       # float32 (B, D) x-vectors (zeros when absent)
    extra_pos_B: np.ndarray     # int32 (B,), NONE when absent
    trailing_BxLt: np.ndarray
    trailing_len_B: np.ndarray


def batch_prompts(cfg: Qwen3TTSConfig, prompts: list[Prompt], length: int | None = None,
                  trailing_length: int | None = None) -> PromptBatch:
    """Left-pad prompts to `length` (default: the longest) like the official batch generate."""
    B = len(prompts)
    L = length or max(len(p) for p in prompts)
    Lt = trailing_length or max(len(p.trailing) for p in prompts)
    G, D = cfg.talker.num_code_groups, cfg.talker.hidden_size
    text = np.full((B, L), NONE, np.int32)
    codec = np.full((B, L, G), NONE, np.int32)
    mask = np.zeros((B, L), bool)
    extra = np.zeros((B, D), np.float32)
    extra_pos = np.full((B,), NONE, np.int32)
    trailing = np.full((B, Lt), cfg.tts_pad_token_id, np.int32)
    trailing_len = np.zeros((B,), np.int32)
    for b, p in enumerate(prompts):
        n = len(p)
        text[b, L - n:] = p.text_L
        codec[b, L - n:] = p.codec_LxG
        mask[b, L - n:] = True
        if p.extra is not None:
            extra[b] = p.extra
            extra_pos[b] = L - n + p.extra_pos
        trailing[b, :len(p.trailing)] = p.trailing
        trailing_len[b] = len(p.trailing)
    return PromptBatch(text, codec, mask, extra, extra_pos, trailing, trailing_len)


# ---------------------------------------------------------------------- per-mode builders
# The checked prompts of each mode, from the user's arguments (a value, or one per text: the
# official broadcasting). Every front door (API, batch tool, server) builds its prompts here.

def check_texts(texts: list) -> None:
    if not texts:
        raise ValueError("no text given: `text` is an empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text[{i}] must be a str, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"text[{i}] is empty or whitespace only: nothing to say")


def check_languages(cfg: Qwen3TTSConfig, languages: list) -> list[str]:
    """Lower-cased languages, each one the checkpoint has ("auto" included)."""
    supported = set(cfg.languages)
    bad = [lang for lang in languages if lang is None or str(lang).lower() not in supported]
    if bad:
        raise ValueError(f"unsupported language(s) {bad}; supported: {sorted(supported)}")
    return [str(lang).lower() for lang in languages]


def check_speakers(cfg: Qwen3TTSConfig, speakers: list) -> None:
    if any(s is None or s == "" for s in speakers):
        raise ValueError(f"a speaker is required; this checkpoint has: {sorted(cfg.speakers)}")
    bad = [s for s in speakers if str(s).lower() not in cfg.speakers]
    if bad:
        raise ValueError(f"unknown speaker(s) {bad}; this checkpoint has: {sorted(cfg.speakers)}")


def _texts(text) -> list:
    texts = text if isinstance(text, list) else [text]
    check_texts(texts)
    return texts


def _languages(cfg, language, n: int) -> list[str]:
    return check_languages(cfg, as_list("auto" if language is None else language, n, "language"))


def input_ids(tokenizer, text: str) -> list[int]:
    """The token ids of the text to speak, in the assistant turn of the chat template."""
    return tokenizer.encode(text_mod.assistant_text(text))


def instruct_ids(tokenizer, instruct) -> list[int] | None:
    if instruct is None or instruct == "":
        return None
    if not isinstance(instruct, str):
        raise TypeError(f"instruct must be a str, got {type(instruct).__name__}")
    return tokenizer.encode(text_mod.instruct_text(instruct))


def _instructs_heard(cfg: Qwen3TTSConfig, instructs: list) -> list:
    """The 0.6B CustomVoice model ignores instructions, like the official qwen-tts."""
    if cfg.tts_model_type == "custom_voice" and cfg.tts_model_size in "0b6" and any(instructs):
        log.warning("the 0.6B CustomVoice model ignores `instruct` (like the official "
                    "qwen-tts); use a 1.7B CustomVoice checkpoint for instructions")
        return [""] * len(instructs)
    return instructs


def custom_voice(cfg: Qwen3TTSConfig, tokenizer, text, speaker, language=None, instruct=None,
                 non_streaming_mode: bool = True) -> list[Prompt]:
    """Prompts of preset speakers (CustomVoice checkpoints); instruct only on the 1.7B."""
    texts = _texts(text)
    n = len(texts)
    languages = _languages(cfg, language, n)
    speakers = as_list(speaker, n, "speaker")
    check_speakers(cfg, speakers)
    instructs = _instructs_heard(cfg, as_list(instruct if instruct is not None else "", n,
                                              "instruct"))
    return [build_prompt(cfg, input_ids(tokenizer, t), lang, spk, instruct_ids(tokenizer, ins),
                         non_streaming_mode)
            for t, spk, lang, ins in zip(texts, speakers, languages, instructs)]


def _check_design(instruct) -> None:
    if instruct is None:
        raise ValueError("generate_voice_design needs `instruct`: a description of the voice, "
                         "e.g. 'A warm, low female voice, speaking slowly.'")


def voice_design(cfg: Qwen3TTSConfig, tokenizer, text, instruct, language=None,
                 non_streaming_mode: bool = True) -> list[Prompt]:
    """Prompts of a voice described in words (VoiceDesign checkpoints)."""
    texts = _texts(text)
    n = len(texts)
    _check_design(instruct)
    instructs = as_list(instruct, n, "instruct")
    languages = _languages(cfg, language, n)
    return [build_prompt(cfg, input_ids(tokenizer, t), lang, None, instruct_ids(tokenizer, ins),
                         non_streaming_mode)
            for t, lang, ins in zip(texts, languages, instructs)]


def check_voices(cfg: Qwen3TTSConfig, voices: list) -> None:
    t = cfg.talker
    check_items(voices, t.hidden_size, t.num_code_groups, t.code_predictor.vocab_size)


def _clone_parts(cfg: Qwen3TTSConfig, tokenizer, voice: VoiceClonePromptItem) -> dict:
    """The `build_prompt` arguments of a cloned voice: its x-vector, and for ICL its reference
    transcript and codes."""
    icl = voice.icl_mode and voice.ref_code is not None
    return dict(
        xvector=voice.ref_spk_embedding if (voice.x_vector_only_mode or voice.icl_mode) else None,
        ref_ids=tokenizer.encode(text_mod.ref_text(voice.ref_text)) if icl else None,
        ref_code=voice.ref_code if icl else None)


def voice_clone(cfg: Qwen3TTSConfig, tokenizer, text, voices: list[VoiceClonePromptItem],
                language=None, non_streaming_mode: bool = False) -> list[Prompt]:
    """Prompts in cloned voices (Base checkpoints): one voice, or one per text."""
    texts = _texts(text)
    n = len(texts)
    languages = _languages(cfg, language, n)
    voices = as_list(voices, n, "voice_clone_prompt")
    check_voices(cfg, voices)
    return [build_prompt(cfg, input_ids(tokenizer, t), lang, None, None, non_streaming_mode,
                         **_clone_parts(cfg, tokenizer, v))
            for t, lang, v in zip(texts, languages, voices)]


def for_mode(cfg: Qwen3TTSConfig, tokenizer, text, language=None, speaker=None, instruct=None,
             voices=None, non_streaming_mode: bool | None = None) -> list[Prompt]:
    """The prompts of the checkpoint's own mode (one dispatch for every front door): preset
    `speaker`s with optional `instruct` (CustomVoice), `instruct` descriptions (VoiceDesign) or
    cloned `voices` (Base). `non_streaming_mode` None is each mode's official default (True,
    True, False)."""
    kind = cfg.tts_model_type
    if kind == "custom_voice":
        return custom_voice(cfg, tokenizer, text, speaker, language, instruct,
                            True if non_streaming_mode is None else non_streaming_mode)
    if kind == "voice_design":
        return voice_design(cfg, tokenizer, text, instruct, language,
                            True if non_streaming_mode is None else non_streaming_mode)
    if voices is None:
        raise ValueError("a Base checkpoint speaks in a cloned voice: pass its voice")
    return voice_clone(cfg, tokenizer, text, voices, language,
                       False if non_streaming_mode is None else non_streaming_mode)


@dataclasses.dataclass(frozen=True)
class PiecesPrompt:
    """The prompt of one utterance whose text arrives in pieces, read in the official streaming
    text mode: `build(tokens, final)` makes the prompt from the text tokens received so far. The
    prompt holds the text sequence's first `room` ids (one token, or for an ICL clone as many as
    its reference frames hold, the reference transcript's `prefix` first); the rest is the
    trailing text the frame loop reads one token per frame (`text_feed.TextFeed`)."""
    build: Callable[[list[int], bool], Prompt]
    room: int
    prefix: list[int]
    eos_id: int
    pad_id: int


def pieces(cfg: Qwen3TTSConfig, tokenizer, language=None, speaker: str | None = None,
           instruct: str | None = None, voice: VoiceClonePromptItem | None = None) -> PiecesPrompt:
    """The checked `PiecesPrompt` of the checkpoint's mode: a preset `speaker` (CustomVoice, with
    an optional `instruct` on the 1.7B), an `instruct` (VoiceDesign) or a cloned `voice` (Base)."""
    kind = cfg.tts_model_type
    language = check_languages(cfg, ["auto" if language is None else language])[0]
    if kind == "custom_voice":
        check_speakers(cfg, [speaker])
        instruct = _instructs_heard(cfg, [instruct or ""])[0]
    elif kind == "voice_design":
        _check_design(instruct)
        speaker = None
    else:
        if voice is None:
            raise ValueError("a Base checkpoint speaks in a cloned voice: pass its voice")
        check_voices(cfg, [voice])
        speaker, instruct = None, None
    template = input_ids(tokenizer, "x")
    head, tail = template[:3], template[-5:]
    ins_ids = instruct_ids(tokenizer, instruct)
    clone: dict = {}
    room, prefix = 1, []
    if voice is not None:
        clone = _clone_parts(cfg, tokenizer, voice)
        if clone["ref_code"] is not None:
            room, prefix = 1 + len(voice.ref_code), clone["ref_ids"][3:-2]

    def build(tokens: list[int], final: bool) -> Prompt:
        return build_prompt(cfg, head + tokens[:max(1, room - len(prefix))] + tail, language,
                            speaker, ins_ids, non_streaming_mode=False, **clone)

    return PiecesPrompt(build, room, prefix, cfg.tts_eos_token_id, cfg.tts_pad_token_id)
