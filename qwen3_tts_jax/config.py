"""Frozen configs read from a checkpoint's config.json and generation_config.json.

Only the values that the official code (qwen-tts 0.1.1) actually reads are kept. Where the json omits a
value, the default is the official config class's default, NOT the released value, because that is what
the official model would run with. Traps (see shared NOTES.md section 2):
- the talker's `head_dim` is not a named parameter of the official class: when absent it silently
  becomes hidden_size // num_attention_heads; we do the same.
- the talker's interleaved multimodal RoPE always receives three identical position rows, so it is
  exactly plain 1-D RoPE; `mrope_section` and `position_id_per_seconds` are therefore not needed.
- `im_start/im_end/assistant` ids are never read (the prompt is sliced by position).
- released checkpoints all use SiLU and plain RoPE, but the official code looks `hidden_act` up in
  transformers' ACT2FN and `rope_scaling.rope_type` in its RoPE initialisers; we honour the same
  fields (`activations.py`, `layers.rope_frequencies`) and refuse, by name, what we do not.
- the predictor config's own `num_code_groups` (class default 32) sizes its tables; a frame uses
  the first talker-`num_code_groups` - 1 of them, as the official generate does.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

MODEL_TYPES = ("custom_voice", "voice_design", "base")


class FrozenDict(dict):
    """A dict that can sit in a frozen (hashable) config: configs are static jit arguments."""

    def __hash__(self):
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

    def _readonly(self, *a, **k):
        raise TypeError("config mappings are read-only")

    __setitem__ = __delitem__ = update = pop = clear = setdefault = _readonly


class ConfigError(ValueError):
    """A config.json that the official code could not load either."""


def read_json(file: str) -> dict:
    """The JSON object in `file`; a file that is not valid JSON, or holds no object, is a
    ConfigError naming it (a missing or unreadable file stays an OSError, which names it)."""
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(d).__name__}")
    return d


# JSON types a dataclass field annotation accepts (annotations are strings here: `from __future__`).
_JSON_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"),
               "str": ((str,), "a string"), "bool": ((bool,), "true or false"),
               "tuple": ((list, tuple), "a list")}


def check_fields(vals: Mapping[str, Any], cls, section: str) -> None:
    """A ConfigError naming `section` and the field for a value of the wrong JSON type (e.g.
    "hidden_size": "32"), before it reaches arithmetic or jit as garbage. A null
    num_key_value_heads means num_attention_heads (the official classes' rule)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for name, v in vals.items():
        ann = types.get(name, "")
        if v is None and (ann.endswith("| None") or name == "num_key_value_heads"):
            continue
        ann = ann.removesuffix(" | None")
        want, what = (_JSON_TYPES.get(ann) or (((Mapping,), "an object")
                                               if ann.startswith("Mapping") else (None, None)))
        if want and (not isinstance(v, want) or (isinstance(v, bool) and bool not in want)):
            raise ConfigError(f"{section} {name} must be {what}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """One Qwen3-style decoder stack (talker trunk or code predictor)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str = "silu"                     # a key of `activations.ACTIVATIONS`
    max_position_embeddings: int = 32768         # only yarn's frequencies read it
    rope_scaling: Mapping[str, Any] | None = None  # None: plain RoPE; else a `ROPE_TYPES` type

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclasses.dataclass(frozen=True)
class CodePredictorConfig(TransformerConfig):
    vocab_size: int = 2048
    num_code_groups: int = 32


@dataclasses.dataclass(frozen=True)
class TalkerConfig(TransformerConfig):
    vocab_size: int = 3072
    text_vocab_size: int = 151936
    text_hidden_size: int = 2048
    num_code_groups: int = 32
    codec_eos_token_id: int = 4198
    codec_think_id: int = 4202
    codec_nothink_id: int = 4203
    codec_think_bos_id: int = 4204
    codec_think_eos_id: int = 4205
    codec_pad_id: int = 4196
    codec_bos_id: int = 4197
    spk_id: Mapping[str, int] = dataclasses.field(default_factory=FrozenDict)
    spk_is_dialect: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
    codec_language_id: Mapping[str, int] = dataclasses.field(default_factory=FrozenDict)
    code_predictor: CodePredictorConfig | None = None

    @property
    def has_mtp_projection(self) -> bool:
        """The 1.7B predictor is narrower than the talker: small_to_mtp_projection is a Linear."""
        return self.code_predictor.hidden_size != self.hidden_size


@dataclasses.dataclass(frozen=True)
class SpeakerEncoderConfig:
    mel_dim: int = 128
    enc_dim: int = 1024
    enc_channels: tuple = (512, 512, 512, 512, 1536)
    enc_kernel_sizes: tuple = (5, 3, 3, 3, 1)
    enc_dilations: tuple = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128
    sample_rate: int = 24000


@dataclasses.dataclass(frozen=True)
class Qwen3TTSConfig:
    talker: TalkerConfig
    speaker_encoder: SpeakerEncoderConfig | None
    tts_model_type: str           # custom_voice | voice_design | base
    tts_model_size: str           # "0b6" | "1b7"
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673
    transformers_version: str | None = None

    @property
    def speakers(self) -> dict:
        return {k.lower(): v for k, v in self.talker.spk_id.items()}

    @property
    def languages(self) -> list[str]:
        """'auto' plus the non-dialect languages, like the official get_supported_languages."""
        names = [k.lower() for k in self.talker.codec_language_id if "dialect" not in k.lower()]
        return ["auto"] + sorted(names)


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json, merged like the official wrapper: json value, else hard default."""
    do_sample: bool = True
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 0.9
    repetition_penalty: float = 1.05
    subtalker_dosample: bool = True
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    subtalker_temperature: float = 0.9
    max_new_tokens: int = 2048

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenerationDefaults":
        names = {f.name for f in dataclasses.fields(cls)}
        vals = {k: v for k, v in d.items() if k in names and v is not None}
        check_fields(vals, cls, "generation_config.json")
        return cls(**vals)


def _pick(d: Mapping[str, Any], cls, section: str, **defaults):
    if not isinstance(d, Mapping):
        raise ConfigError(f"{section} must be an object, got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    vals = dict(defaults)
    vals.update({k: v for k, v in d.items() if k in names})
    check_fields(vals, cls, section)
    return vals


def _predictor_window_masks(cp: Mapping[str, Any], cp_vals: Mapping[str, Any],
                            t_vals: Mapping[str, Any]) -> bool:
    """Whether the code predictor's sliding window hides any position. The official config
    makes layer i a sliding layer when use_sliding_window and i >= max_window_layers (default 28)
    or as `layer_types` says; a window of w keeps the last w positions. The predictor's sequence
    is at most num_code_groups positions (hidden state, code 0, then codes 1..G-2), so a window
    of at least that many (the default is 4096) masks nothing: the same model as without it."""
    window = cp.get("sliding_window", 4096)
    if not cp.get("use_sliding_window") or window is None:
        return False
    layers = cp_vals["num_hidden_layers"]
    types = cp.get("layer_types") or ["sliding_attention" if i >= cp.get("max_window_layers", 28)
                                      else "full_attention" for i in range(layers)]
    longest = max(cp_vals.get("num_code_groups") or 32, t_vals.get("num_code_groups") or 16)
    return "sliding_attention" in types and window < longest


def _check_codec_ids(talker: "TalkerConfig") -> None:
    """Speaker and language codec ids index the talker's codec embedding: an id outside it would
    silently read garbage (jnp.take clamps), so refuse it by name."""
    V = talker.vocab_size
    for field in ("spk_id", "codec_language_id"):
        for name, i in getattr(talker, field).items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < V:
                raise ConfigError(f"talker_config {field} {name!r} is {i!r}, outside the talker's "
                                  f"codec vocabulary [0, {V}) (vocab_size)")
    for name, dialect in talker.spk_is_dialect.items():
        if dialect and dialect not in talker.codec_language_id:
            raise ConfigError(f"talker_config spk_is_dialect {name!r} is {dialect!r}, which is not "
                              f"in codec_language_id {sorted(talker.codec_language_id)}")


# transformers' RoPE types whose frequencies are fixed at load time (`layers.rope_frequencies`), with
# the rope_scaling keys each one requires. "dynamic" and "longrope" recompute them as a sequence
# grows past max_position_embeddings, inside the official forward: not supported (a clear error).
ROPE_TYPES = {"default": (), "linear": ("factor",), "yarn": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}


def rope_scaling_of(c: Mapping[str, Any], name: str):
    """A config's rope_scaling as the official reads it: None for plain RoPE, else a FrozenDict of
    its scalar entries (the talker's `mrope_section` does not change the result: its three
    position rows are equal)."""
    rs = c.get("rope_scaling")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{name} partial_rotary_factor {c['partial_rotary_factor']} is not "
                          "supported (RoPE over the whole head_dim only, as released)")
    if rs is None:
        return None
    if not isinstance(rs, Mapping):
        raise ConfigError(f"{name} rope_scaling must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{name} rope_scaling rope_type {kind!r} is not supported (supported: "
                          f"{sorted(ROPE_TYPES)}; 'dynamic' and 'longrope' change with the "
                          "sequence length)")
    missing = [k for k in ROPE_TYPES[kind] if rs.get(k) is None]
    if missing:
        raise ConfigError(f"{name} rope_scaling of type {kind!r} lacks {missing}")
    if kind == "default":
        return None
    return FrozenDict({k: v for k, v in rs.items() if k != "type"
                       and (v is None or isinstance(v, (bool, int, float, str)))}
                      | {"rope_type": kind})


def parse_talker(d: Mapping[str, Any]) -> TalkerConfig:
    if not isinstance(d, Mapping):
        raise ConfigError(f"talker_config must be an object, got {d!r}")
    cp = d.get("code_predictor_config") or {}
    # Official class defaults of Qwen3TTSTalkerCodePredictorConfig (head_dim has a default there).
    cp_vals = _pick(cp, CodePredictorConfig, "code_predictor_config", hidden_size=1024,
                    intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0)
    if cp_vals.get("num_key_value_heads") is None:
        cp_vals["num_key_value_heads"] = cp_vals["num_attention_heads"]
    cp = dict(cp)
    t_vals = _pick(d, TalkerConfig, "talker_config", hidden_size=1024, intermediate_size=2048,
                   num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=2,
                   rms_norm_eps=1e-6, rope_theta=10000.0)
    t_vals.setdefault("head_dim", t_vals["hidden_size"] // t_vals["num_attention_heads"])
    if t_vals.get("num_key_value_heads") is None:
        t_vals["num_key_value_heads"] = t_vals["num_attention_heads"]
    for k in ("spk_id", "spk_is_dialect", "codec_language_id"):
        t_vals[k] = FrozenDict(t_vals.get(k) or {})
    for c, name in ((d, "talker_config"), (cp, "code_predictor_config")):
        if c.get("attention_bias"):
            raise ConfigError(f"{name} sets attention_bias, which no released Qwen3-TTS "
                              "checkpoint uses and this port does not implement")
    if d.get("use_sliding_window"):
        raise ConfigError("talker_config sets use_sliding_window, which no released Qwen3-TTS "
                          "checkpoint uses and this port does not implement")
    if _predictor_window_masks(cp, cp_vals, t_vals):
        raise ConfigError("code_predictor_config sets use_sliding_window with a window shorter "
                          "than the predictor's sequence on some layer, which no released "
                          "Qwen3-TTS checkpoint uses and this port does not implement")
    from .activations import ACTIVATIONS
    for c, vals, name in ((d, t_vals, "talker_config"), (cp, cp_vals, "code_predictor_config")):
        vals["rope_scaling"] = rope_scaling_of(c, name)
        if vals.get("hidden_act", "silu") not in ACTIVATIONS:
            raise ConfigError(f"{name} hidden_act {vals['hidden_act']!r} is not supported "
                              f"(supported: {sorted(ACTIVATIONS)})")
    t_vals["code_predictor"] = CodePredictorConfig(**cp_vals)
    talker = TalkerConfig(**t_vals)
    if talker.code_predictor.num_code_groups < talker.num_code_groups:
        raise ConfigError(f"code_predictor_config num_code_groups "
                          f"({talker.code_predictor.num_code_groups}) is below the talker's "
                          f"({talker.num_code_groups}): the predictor lacks heads for some groups")
    # Shapes the official model cannot run either (it fails in forward): refused by name.
    for c, name in ((talker, "talker_config"), (talker.code_predictor, "code_predictor_config")):
        if c.num_attention_heads % c.num_key_value_heads:
            raise ConfigError(f"{name} num_attention_heads ({c.num_attention_heads}) is not a "
                              f"multiple of num_key_value_heads ({c.num_key_value_heads}); the "
                              "official model cannot run it either")
        if c.head_dim % 2:
            raise ConfigError(f"{name} head_dim ({c.head_dim}) must be even (rotate-half RoPE); "
                              "the official model cannot run it either")
    _check_codec_ids(talker)
    return talker


def check_speaker_encoder(cfg: SpeakerEncoderConfig) -> None:
    """ConfigError for a speaker_encoder_config the official `Qwen3TTSSpeakerEncoder` cannot run
    either: it refuses lists of unequal length, fails in forward on the channel shapes, and
    `extract_speaker_embedding` makes 128 mel bands of 24 kHz audio whatever the config says."""
    ch, n = cfg.enc_channels, len(cfg.enc_channels)
    problems = []
    if not n == len(cfg.enc_kernel_sizes) == len(cfg.enc_dilations) or n < 3:
        problems.append("enc_channels, enc_kernel_sizes and enc_dilations need the same length "
                        "(>= 3)")
    elif any(c != ch[0] for c in ch[:-1]):
        problems.append(f"enc_channels[:-1] must be equal (the SE-Res2Net residual adds them): "
                        f"{list(ch)}")
    elif sum(ch[1:-1]) != ch[-1]:
        problems.append(f"enc_channels[-1] must be the sum of enc_channels[1:-1] (the MFA "
                        f"input): {list(ch)}")
    elif ch[0] % cfg.enc_res2net_scale:
        problems.append(f"enc_channels {ch[0]} must be divisible by enc_res2net_scale "
                        f"{cfg.enc_res2net_scale}")
    if cfg.mel_dim != 128:
        problems.append(f"mel_dim is {cfg.mel_dim}; extract_speaker_embedding always makes 128 "
                        "mel bands")
    if cfg.sample_rate != 24000:
        problems.append(f"sample_rate is {cfg.sample_rate}; extract_speaker_embedding only "
                        "supports 24000 Hz")
    if problems:
        raise ConfigError("speaker_encoder_config: " + "; ".join(problems)
                          + " (the official speaker encoder cannot run it either)")


def parse_config(d: Mapping[str, Any]) -> Qwen3TTSConfig:
    if d.get("model_type") not in (None, "qwen3_tts"):
        raise ConfigError(f"config.json has model_type {d.get('model_type')!r}, expected 'qwen3_tts' "
                          "(is this a Qwen3-TTS model folder, not the speech tokenizer?)")
    if "talker_config" not in d:
        raise ConfigError("config.json has no talker_config: not a Qwen3-TTS model checkpoint")
    kind = d.get("tts_model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"config.json tts_model_type is {kind!r}; expected one of {MODEL_TYPES}")
    spk = None
    if kind == "base":
        spk = SpeakerEncoderConfig(**_pick(d.get("speaker_encoder_config") or {},
                                           SpeakerEncoderConfig, "speaker_encoder_config"))
        spk = dataclasses.replace(spk, enc_channels=tuple(spk.enc_channels),
                                  enc_kernel_sizes=tuple(spk.enc_kernel_sizes),
                                  enc_dilations=tuple(spk.enc_dilations))
        check_speaker_encoder(spk)
    top = _pick({k: v for k, v in d.items() if k not in ("talker", "speaker_encoder")},
                Qwen3TTSConfig, "config.json")
    return Qwen3TTSConfig(talker=parse_talker(d["talker_config"]), speaker_encoder=spk,
                          **{k: v for k, v in top.items() if v is not None})


def load_config(path: str) -> Qwen3TTSConfig:
    file = os.path.join(path, "config.json")
    d = read_json(file)
    try:
        return parse_config(d)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def load_generation_defaults(path: str) -> GenerationDefaults:
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: every Qwen3-TTS checkpoint ships one "
                                "(the official loader requires it too)")
    try:
        return GenerationDefaults.from_dict(read_json(file))
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
