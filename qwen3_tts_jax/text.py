"""Text side of Qwen3-TTS: the chat prompt strings and a Qwen2 byte-level BPE tokenizer that gives
the same ids as the official processor (`AutoProcessor.from_pretrained(path, fix_mistral_regex=True)`
with transformers 4.57.3), using only the `tokenizers` library.

Loading mirrors `Qwen2TokenizerFast.from_pretrained` on a local folder:
- `tokenizer.json` if present (unless tokenizer_config has `from_slow`); otherwise the backend is built
  from `vocab.json` + `merges.txt` exactly like transformers' Qwen2Converter (NFC normalizer, Qwen2 split
  regex + ByteLevel(use_regex=False), ByteLevel decoder and post-processor).
- then the added/special tokens of `tokenizer_config.json` (`added_tokens_decoder`, or the legacy
  `added_tokens.json` + `special_tokens_map.json`) are added in the same order and with the same flags,
  so the ids of added tokens follow the same rules.
- `split_special_tokens` is honoured; no truncation and no padding (one text per call, as the official
  wrapper does). `encode` applies the file's post-processor like `processor(text=...)` does; for Qwen2
  (ByteLevel post-processor, or none) that adds no BOS/EOS.

fix_mistral_regex (transformers 4.57.3, tokenization_utils_base.py:2389-2500, `_patch_mistral_regex`):
- considered only if the BASE vocab (`vocab_size`, added tokens not counted) is > 100000 and the backend
  has a pre-tokenizer;
- local folder: reads the folder's config.json; NOT patched if there is no config.json, or if
  `transformers_version` <= 4.57.2 with a `model_type` set and not mistral/mistral3/voxtral/ministral/
  pixtral, or if `transformers_version` >= 5.0.0. Everything else is patched: 4.57.2 < version < 5.0.0
  (incl. "4.57.3", "5.0.0.dev0"), a missing/empty `transformers_version`, an old version without
  `model_type` (or with a Mistral one);
- hub id: patched only if the repo's tags match `base_model:.*mistralai` (network call) -- not Qwen;
- the patch (with fix_mistral_regex=True, which the official wrapper always passes) sets
  `pre_tokenizer[0] = Split(Regex(MISTRAL_PATTERN), behavior="isolated")`.
MISTRAL_PATTERN has no contraction alternative, splits at lower->upper case changes and keeps combining
marks (\\p{M}) inside words. Pre-tokens, Qwen2 -> patched: "HelloWorld" -> "Hello"|"World"; "iPhone" ->
"i"|"Phone"; "ПриветМир" -> "Привет"|"Мир"; "it'sgood" "it"|"'s"|"good" -> "it"|"'sgood";
"नमस्ते" "नमस"|"्त"|"े" -> one piece. Unchanged: "don't", "I'M", "HTTPServer", CJK, digits, URLs,
whitespace; NFD marks are composed first by the NFC normalizer of real Qwen tokenizers. Ids change where
the vocabulary has merges across the new boundaries (test tokenizer: "HelloWorld" 1 id -> 2 ids).
Qwen's merges were learned with the Qwen2 regex, so on the real vocab the likely changes are the new
case splits (camelCase, "iPhone").
Released Qwen3-TTS folders are very likely patched: vocab 151643 > 100000, and users report the
"incorrect regex pattern" warning (printed only when the config check says "patch") for local
Qwen3-TTS-12Hz-0.6B-CustomVoice / 1.7B-CustomVoice / 1.7B-Base folders. So the official wrapper uses
MISTRAL_PATTERN on a local folder, and the Qwen2 regex when given a hub id. `TextTokenizer.from_dir`
applies the local-folder rule to the folder's config.json; `mistral_regex=False` matches a hub-id load.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

from packaging.version import Version
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

from .config import ConfigError, read_json

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
MISTRAL_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                   r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                   r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
MISTRAL_MODEL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")
MISTRAL_MIN_VOCAB = 100000  # the patch is considered only when vocab_size > this

_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token", "additional_special_tokens")
# Qwen2TokenizerFast.__init__ defaults; these four are wrapped as AddedToken(special, not normalized).
_QWEN2_DEFAULTS = {"bos_token": None, "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}


# ----------------------------------------------------------------------------------------------------
# Prompt strings of the official wrapper (qwen_tts/inference/qwen3_tts_model.py, _build_*_text).

def assistant_text(text: str) -> str:
    """Target text prompt; the model slices it by position ([:3] role, [3:-5] text)."""
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


def ref_text(text: str) -> str:
    """ICL reference transcript prompt ([3:-2] is the text)."""
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


def instruct_text(text: str) -> str:
    """Voice / style instruction prompt."""
    return f"<|im_start|>user\n{text}<|im_end|>\n"


# ----------------------------------------------------------------------------------------------------
# fix_mistral_regex decision (transformers 4.57.3 PreTrainedTokenizerBase._patch_mistral_regex).

def _parse_version(v: str) -> Version:
    return Version(v)  # packaging (a huggingface_hub dependency), as transformers uses


def mistral_regex_applies(config: Optional[dict], vocab_size: int, *, is_local: bool = True,
                          hub_tagged_mistral: bool = False) -> bool:
    """Whether transformers 4.57.3 with `fix_mistral_regex=True` replaces the split regex.

    config: the parsed config.json next to the tokenizer (None: no such file). vocab_size: base vocab
    (without added tokens). is_local: loaded from a folder (True) or a hub id. hub_tagged_mistral: for a
    hub id, whether its tags match "base_model:.*mistralai" (never for Qwen repos)."""
    if vocab_size <= MISTRAL_MIN_VOCAB:
        return False
    if not (is_local or hub_tagged_mistral):
        return False
    detected = False
    if config is not None:
        tv = config.get("transformers_version")
        mt = config.get("model_type")
        if tv and _parse_version(tv) <= _parse_version("4.57.2"):
            if is_local and mt is not None and mt not in MISTRAL_MODEL_TYPES:
                return False
        elif tv and _parse_version(tv) >= _parse_version("5.0.0"):
            return False
        detected = True
    return detected or (not is_local and hub_tagged_mistral)


# ----------------------------------------------------------------------------------------------------
# Loading helpers (mirroring transformers 4.57.3 _from_pretrained / PreTrainedTokenizerFast.__init__).

def _read_json(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    return read_json(path)


def _convert_added_tokens(obj):
    """transformers convert_added_tokens(save=False): {"__type": "AddedToken", ...} -> AddedToken."""
    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        obj = dict(obj)
        obj.pop("__type")
        return AddedToken(**obj)
    if isinstance(obj, (list, tuple)):
        return [_convert_added_tokens(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_added_tokens(v) for k, v in obj.items()}
    return obj


def _qwen2_backend_from_files(vocab_file: str, merges_file: str) -> Tokenizer:
    """Qwen2Tokenizer (slow) + Qwen2Converter, as transformers does when tokenizer.json is absent."""
    vocab = read_json(vocab_file)
    merges = {}
    with open(merges_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if (i == 0 and line.startswith("#version:")) or not line:
                continue
            merges.setdefault(tuple(line.split()), None)  # dict keys: first-occurrence order
    try:
        bpe = models.BPE(vocab=vocab, merges=list(merges), dropout=None, unk_token=None,
                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                         byte_fallback=False)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception: name the files instead
        raise ConfigError(f"{vocab_file} + {merges_file} do not make a BPE tokenizer: "
                          f"{e}") from None
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        # the slow Qwen2Tokenizer has no add_prefix_space attribute -> False
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _load_backend(path: str) -> Tokenizer:
    """Build the backend exactly like Qwen2TokenizerFast.from_pretrained(path) (local folder), in
    transformers' stages: the serialized added and special tokens, the backend itself, the
    special-token attributes, the tokens added to the backend, the pre-tokenizer's prefix space."""
    init = dict(_read_json(os.path.join(path, "tokenizer_config.json")) or {})
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        tokenizer_file = None
    init, added_tokens_decoder = _serialized_tokens(path, init, tokenizer_file)
    backend = _open_backend(path, init, tokenizer_file)
    extended = _special_tokens(init)
    _add_tokens(backend, added_tokens_decoder, extended)
    backend.encode_special_tokens = bool(init.get("split_special_tokens", False))
    _set_prefix_space(backend, init.get("add_prefix_space", False))
    return backend


def _serialized_tokens(path: str, init: dict, tokenizer_file: str | None
                       ) -> tuple[dict, dict[int, AddedToken]]:
    """`_from_pretrained`: the serialized added tokens by id, and `init` with its special tokens
    resolved to them (legacy folders: special_tokens_map.json, added_tokens.json and the
    tokenizer.json's added tokens)."""
    added_tokens_decoder: dict[int, AddedToken] = {}
    added_tokens_map: dict[str, AddedToken] = {}
    if "added_tokens_decoder" in init:
        for idx, token in init["added_tokens_decoder"].items():
            if isinstance(token, dict):
                token = AddedToken(**token)
            if not isinstance(token, AddedToken):
                raise TypeError(f"bad added_tokens_decoder entry {token!r}")
            added_tokens_decoder[int(idx)] = token
            added_tokens_map[str(token)] = token
    else:  # legacy files
        stm = _read_json(os.path.join(path, "special_tokens_map.json"))
        if stm is not None:
            for key, value in stm.items():
                if isinstance(value, dict):
                    value["special"] = True
                    value = AddedToken(**value)
                elif key == "additional_special_tokens" and isinstance(value, list):
                    extra = init.pop("additional_special_tokens", []) or []
                    for token in value:
                        if isinstance(token, dict):
                            token["special"] = True
                            token = AddedToken(**token)
                        if token not in extra:
                            extra.append(token)
                    value = extra
                init[key] = value
        atj = _read_json(os.path.join(path, "added_tokens.json"))
        if atj is not None:
            specials = []
            for key in set(_SPECIAL_ATTRS) & init.keys():
                if init[key] is not None:
                    if key == "additional_special_tokens":
                        specials += [str(t) for t in init[key]]
                    else:
                        specials.append(str(init[key]))
            for str_token, index in atj.items():
                special = str_token in specials
                added_tokens_decoder[index] = AddedToken(str_token, rstrip=False, lstrip=False,
                                                         normalized=not special, special=special)
                # transformers 4.57.3 keys this by str(token) where `token` is its (None) auth-token
                # argument -- reproduced so the special-token lookup below behaves identically.
                added_tokens_map["None"] = added_tokens_decoder[index]
        if tokenizer_file is not None:
            serialized = read_json(tokenizer_file).get("added_tokens", [])
            for st in serialized:
                st = dict(st)
                idx = st.pop("id")
                added_tokens_decoder[idx] = AddedToken(**st)
                added_tokens_map[str(added_tokens_decoder[idx])] = added_tokens_decoder[idx]
    init = _convert_added_tokens(init)
    for key in _SPECIAL_ATTRS:
        if key in init and key != "additional_special_tokens" and added_tokens_map and init[key] is not None:
            init[key] = added_tokens_map.get(str(init[key]), init[key])
    return init, added_tokens_decoder


def _open_backend(path: str, init: dict, tokenizer_file: str | None) -> Tokenizer:
    """tokenizer.json, or (without one, or `from_slow`) the BPE of vocab.json + merges.txt."""
    if tokenizer_file is not None and not init.get("from_slow", False):
        try:
            return Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception ("EOF while parsing ...")
            raise ConfigError(f"{tokenizer_file} cannot be loaded as a tokenizer: {e}") from None
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if not (os.path.isfile(vocab_file) and os.path.isfile(merges_file)):
        raise FileNotFoundError(f"{path}: no tokenizer.json and no vocab.json + merges.txt")
    return _qwen2_backend_from_files(vocab_file, merges_file)


def _special_tokens(init: dict) -> list:
    """Qwen2TokenizerFast.__init__ + SpecialTokensMixin: every special token attribute's value
    (Qwen2's defaults where unset, the extra special tokens), each once, in attribute order."""
    special_map: dict[str, Any] = {}
    for key in _SPECIAL_ATTRS:
        value = init[key] if key in init else _QWEN2_DEFAULTS.get(key)
        if key in _QWEN2_DEFAULTS and isinstance(value, str):
            value = AddedToken(value, lstrip=False, rstrip=False, special=True, normalized=False)
        if value is None:
            continue
        if key == "additional_special_tokens":
            if not isinstance(value, (list, tuple)):
                raise TypeError("additional_special_tokens must be a list")
        elif not isinstance(value, (str, AddedToken)):
            raise TypeError(f"special token {key} must be str or AddedToken, got {type(value)}")
        special_map[key] = value
    extra_special = init.get("extra_special_tokens") or {}
    if isinstance(extra_special, dict):
        for key, value in extra_special.items():
            if isinstance(value, (str, AddedToken)):
                special_map[key] = value
    extended, seen = [], set()
    for value in special_map.values():
        if not value:
            continue
        vals = list(value) if isinstance(value, (list, tuple)) else [value]
        new = [t for t in vals if str(t) not in seen]
        seen.update(map(str, new))
        extended.extend(new)
    return extended


def _add_tokens(backend: Tokenizer, added_tokens_decoder: dict[int, AddedToken],
                extended: list) -> None:
    """PreTrainedTokenizerFast.__init__: add the missing added and special tokens, in this order.
    transformers filters with `{hash(repr(t)) for t in self.added_tokens_decoder}`, which iterates
    the dict's int KEYS, so nothing is filtered: every serialized token is re-added (a token whose
    content exists keeps its id but takes the serialized flags)."""
    all_special = [str(t) for t in extended]
    have = backend.get_added_tokens_decoder()
    to_add = [t for _, t in sorted(added_tokens_decoder.items(), key=lambda x: x[0])]
    encoder = [t.content for _, t in sorted(have.items(), key=lambda x: x[0])] + [str(t) for t in to_add]
    to_add += [t for t in extended if t not in encoder and t not in to_add]
    if not to_add:
        return
    tokens = []
    for t in to_add:
        is_special = (t.special or str(t) in all_special) if isinstance(t, AddedToken) \
            else str(t) in all_special
        if isinstance(t, str):
            t = AddedToken(t, special=is_special)
        else:
            t.special = is_special
        tokens.append(t)
    backend.add_tokens(tokens)


def _set_prefix_space(backend: Tokenizer, add_prefix_space: bool) -> None:
    """The pre-tokenizer rebuilt with the config's `add_prefix_space` where it differs."""
    try:
        state = json.loads(backend.pre_tokenizer.__getstate__())
        if state.get("add_prefix_space", add_prefix_space) != add_prefix_space:
            cls = getattr(pre_tokenizers, state.pop("type"))
            state["add_prefix_space"] = add_prefix_space
            backend.pre_tokenizer = cls(**state)
    except Exception:  # noqa: BLE001 - no / unserializable pre-tokenizer: transformers ignores it too
        pass


class TextTokenizer:
    """Qwen2 byte-level BPE text tokenizer with the official processor's ids.

    `mistral_regex`: whether the split regex was replaced by MISTRAL_PATTERN (see module docstring)."""

    def __init__(self, backend: Tokenizer, mistral_regex: bool = False):
        backend.no_truncation()
        backend.no_padding()
        if mistral_regex:
            # exactly transformers' statement (raises TypeError if the pre-tokenizer is no Sequence)
            backend.pre_tokenizer[0] = pre_tokenizers.Split(pattern=Regex(MISTRAL_PATTERN),
                                                            behavior="isolated")
        self.backend = backend
        self.mistral_regex = bool(mistral_regex)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, mistral_regex: Optional[bool] = None) -> "TextTokenizer":
        """Load from a checkpoint folder (tokenizer.json, or vocab.json + merges.txt, + tokenizer_config).

        mistral_regex: None (default) decides like the official `AutoProcessor.from_pretrained(folder,
        fix_mistral_regex=True)` from the folder's config.json; True/False forces it (False matches the
        official wrapper loaded by hub id)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise NotADirectoryError(path)
        backend = _load_backend(path)
        if mistral_regex is None:
            mistral_regex = (backend.pre_tokenizer is not None and mistral_regex_applies(
                _read_json(os.path.join(path, "config.json")),
                backend.get_vocab_size(with_added_tokens=False), is_local=True))
        return cls(backend, mistral_regex=mistral_regex)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as `processor(text=text)["input_ids"][0]` (special-token strings inside the text
        become their ids; the Qwen2 post-processor adds nothing)."""
        return self.backend.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=True)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        return self.backend.id_to_token(idx)

    @property
    def vocab_size(self) -> int:
        """Base vocabulary size (without added tokens), like transformers' `tokenizer.vocab_size`."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)
