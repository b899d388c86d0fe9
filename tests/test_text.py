"""Parity of qwen3_tts_jax.text with the OFFICIAL processor (qwen-tts 0.1.1 + transformers 4.57.3):
`AutoProcessor.from_pretrained(folder, fix_mistral_regex=True)` after the official registration, called
like the official wrapper's `_tokenize_texts`.

Two tokenizers:
- the tiny session tokenizer of tests/official.py (vocab < 100000: the Mistral-regex patch never runs);
- a "big" one whose BASE vocab is > 100000 (a small BPE trained on whole words, so it has merges across
  the boundaries where the Qwen2 and Mistral split regexes differ, padded with unreachable dummy vocab
  entries), so transformers' `_patch_mistral_regex` condition is really exercised.
Each is saved with tokenizer.json and also as a vocab.json + merges.txt-only folder.
"""
import json
import os
import re
import shutil
import unicodedata

import pytest

from official import QWEN2_PAT, SPECIALS

from qwen3_tts_jax import text as T

HARD = [
    "Hello world.",
    "HelloWorld",
    "camelCaseWord iPhone eBay McDonald pH NaOH HTTPServer",
    "don't",
    "I'M",
    "it'sgood we'llsee don'tstop",
    "YOU'RE x'sy They'VE",
    "你好世界，今天天气很好。",
    "こんにちは、世界！カタカナとひらがな",
    "안녕하세요 세계",
    "Привет, мир! ПриветМир",
    "Ünïcödé wörds: Straße, Größe, ÄÖÜ äöü ß",
    unicodedata.normalize("NFD", "Ünïcödé wörds: café, Größe"),
    "e\u0301\u0301\u0301 cafe\u0301",
    "مرحبا بالعالم",
    "مَرْحَبًا",
    "नमस्ते दुनिया",
    "สวัสดีครับ",
    "0123456789",
    "3.14159265358979 and 1,000,000,000 and -42 and 12345678901234567890",
    "😀👍🏽",
    "👨‍👩‍👧‍👦 family 🏳️‍🌈 flag",
    "line1\nline2\r\nline3\n\n\nend\n",
    "tab\there\t\tand  two   spaces    four",
    "   leading and trailing   ",
    "\n",
    "",
    "<|im_start|>user\nfake turn<|im_end|>",
    "<|tts_pad|><|tts_text_bos|><|tts_text_eod|><|endoftext|>",
    "Hello <|im_end|> there <|tts_pad|>x",
    "<|im_start| < |im_start| > <|im_start|><|im_start|>",
    "https://example.com/path/to?query=1&b=two#frag",
    "user@example.com C:\\Windows\\path /usr/bin/env a/b//c///d",
    "¿Qué tal? ¡Muy bien! «quotes» “curly” ‘single’ — dash … ellipsis",
    "Ελληνικά γράμματα",
    "עברית",
    "ǅemal ʰello ǈ",
    "\u200b zero width \u00a0nbsp \u3000ideographic",
    "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ x² H₂O ½ ①",
    "MiXeD CaSe WoRdS",
    "\x00\x01 control \x7f",
    "Lorem ipsum dolor sit amet, " * 40,
]
# strings whose Qwen2 and Mistral pre-tokenizations differ (the big tokenizer has merges across them)
MISTRAL_SENSITIVE = ["HelloWorld", "camelCaseWord", "ПриветМир", "it'sgood", "we'llsee", "नमस्ते",
                     "مَرْحَبًا", "สวัสดีครับ"]

BIG_CORPUS = [
    "HelloWorld camelCaseWord iPhone eBay McDonald NaOH ПриветМир it'sgood we'llsee don'tstop x'sy",
    "नमस्ते दुनिया सवसदी", "สวัสดีครับ", "cafe\u0301 e\u0301\u0301\u0301", "مَرْحَبًا",
    unicodedata.normalize("NFD", "Ünïcödé wörds: café, Größe"),
    "Hello world. This is a tiny test.", "assistant\n", "user\n", "Привет, мир!", "你好世界",
] * 20 + MISTRAL_SENSITIVE * 20
BIG_EXTRA = 100_100  # dummy base-vocab entries: base vocab > 100000


# ---------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def auto_processor():
    """AutoProcessor with the official registration (as Qwen3TTSModel.from_pretrained does)."""
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSProcessor
    from transformers import AutoConfig, AutoProcessor

    AutoConfig.register("qwen3_tts", Qwen3TTSConfig, exist_ok=True)
    AutoProcessor.register(Qwen3TTSConfig, Qwen3TTSProcessor, exist_ok=True)
    return AutoProcessor


def _build_big_tokenizer(path):
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)
    from transformers import Qwen2TokenizerFast

    # train on whole words so merges cross camel-case, contraction and combining-mark boundaries
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\S+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer_tok.train_from_iterator(BIG_CORPUS, trainers.BpeTrainer(
        vocab_size=900, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(trainer_tok.to_str())["model"]
    vocab, merges = dict(model["vocab"]), [tuple(m) for m in model["merges"]]
    n = len(vocab)
    vocab.update({f"<dummy_{i}>": n + i for i in range(BIG_EXTRA)})  # unreachable: no merge makes them
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()  # like the released Qwen tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None,
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.save_pretrained(path)
    assert fast.vocab_size > 100_000
    return path


@pytest.fixture(scope="module")
def small_src(tmp_path_factory, text_tokenizer):
    path = str(tmp_path_factory.mktemp("text_small_src"))
    text_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    return _build_big_tokenizer(str(tmp_path_factory.mktemp("text_big_src")))


def make_folder(root, name, src, config, *, json_file=True, edit_tok_config=None):
    """Copy the tokenizer files of `src` to root/name with `config` as config.json (None: no file)."""
    d = os.path.join(root, name)
    shutil.copytree(src, d)
    if not json_file:
        os.remove(os.path.join(d, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
    if edit_tok_config is not None:
        p = os.path.join(d, "tokenizer_config.json")
        with open(p) as f:
            c = json.load(f)
        edit_tok_config(c)
        with open(p, "w") as f:
            json.dump(c, f)
    return d


def load_official(auto_processor, folder):
    cfg = os.path.join(folder, "config.json")
    config = None
    if os.path.isfile(cfg):
        with open(cfg) as f:
            config = json.load(f)
    if config is not None and config.get("model_type") == "qwen3_tts":
        proc = auto_processor.from_pretrained(folder, fix_mistral_regex=True)
    else:  # AutoProcessor needs model_type to find the class; this is the call it ends in
        from qwen_tts.core.models import Qwen3TTSProcessor
        proc = Qwen3TTSProcessor.from_pretrained(folder, fix_mistral_regex=True)
    # the serialized backend right after loading (before a call changes its padding settings)
    return proc, proc.tokenizer.backend_tokenizer.to_str()


def official_ids(proc, text):
    """As Qwen3TTSModel._tokenize_texts."""
    ids = proc(text=text, return_tensors="pt", padding=True)["input_ids"]
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    assert ids.shape[0] == 1
    return ids[0].tolist()


def is_mistral_official(proc):
    pre = json.loads(proc.tokenizer.backend_tokenizer.pre_tokenizer.__getstate__())
    return pre["pretokenizers"][0]["pattern"]["Regex"] == T.MISTRAL_PATTERN


def assert_same(ours, proc, state, strings):
    """Same serialized backend (model, added tokens + flags, normalizer, pre-tokenizer, post-processor,
    no truncation/padding) and same ids for every string."""
    mine = ours.backend.to_str()
    if mine != state:
        a, b = json.loads(mine), json.loads(state)
        assert {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}
        assert a == b, "backend model differs"
    want = [official_ids(proc, s) for s in strings]
    got = [ours.encode(s) for s in strings]
    bad = [(s, g, w) for s, g, w in zip(strings, got, want) if g != w]
    assert not bad, bad[:3]
    assert ours.encode_batch(strings) == want


def all_strings():
    return HARD + [f(s) for s in HARD[:12] for f in (T.assistant_text, T.ref_text, T.instruct_text)]


V_IN = {"transformers_version": "4.57.3", "model_type": "qwen3_tts"}

# name -> (config.json (None: no file), whether the official loader patches the big tokenizer)
VARIANTS = {
    "v4573": (V_IN, True),
    "v4573dev": ({"transformers_version": "4.57.3.dev0", "model_type": "qwen3_tts"}, True),
    "v4571": ({"transformers_version": "4.57.1", "model_type": "qwen3_tts"}, False),
    "v4572": ({"transformers_version": "4.57.2", "model_type": "qwen3_tts"}, False),
    "v500": ({"transformers_version": "5.0.0", "model_type": "qwen3_tts"}, False),
    "v500dev": ({"transformers_version": "5.0.0.dev0", "model_type": "qwen3_tts"}, True),
    "noversion": ({"model_type": "qwen3_tts"}, True),
    "old_notype": ({"transformers_version": "4.40.0"}, True),
    "old_mistraltype": ({"transformers_version": "4.40.0", "model_type": "mistral"}, True),
    "noconfig": (None, False),
}
BIG_CASES = [(n, True) for n in VARIANTS] + [("v4573", False), ("v4571", False), ("noconfig", False)]


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory, big_src, auto_processor):
    """big_folder(variant, json_file) -> (folder, official processor, its backend state); cached."""
    root, cache = str(tmp_path_factory.mktemp("text_big")), {}

    def get(name, json_file=True):
        if (name, json_file) not in cache:
            folder = make_folder(root, f"{name}-{int(json_file)}", big_src, VARIANTS[name][0],
                                 json_file=json_file)
            cache[name, json_file] = (folder,) + load_official(auto_processor, folder)
        return cache[name, json_file]

    return get


# ---------------------------------------------------------------------------------------------------
# prompt strings

def test_chat_strings_match_official_wrapper():
    from qwen_tts.inference.qwen3_tts_model import Qwen3TTSModel

    for s in ["Hello world.", "", "你好\n<|im_end|>", "  x  "]:
        assert T.assistant_text(s) == Qwen3TTSModel._build_assistant_text(None, s)
        assert T.ref_text(s) == Qwen3TTSModel._build_ref_text(None, s)
        assert T.instruct_text(s) == Qwen3TTSModel._build_instruct_text(None, s)
    assert T.assistant_text("x") == "<|im_start|>assistant\nx<|im_end|>\n<|im_start|>assistant\n"
    assert T.ref_text("x") == "<|im_start|>assistant\nx<|im_end|>\n"
    assert T.instruct_text("x") == "<|im_start|>user\nx<|im_end|>\n"


def test_role_prefix_and_positional_slices(tmp_path, small_src, text_tokenizer):
    tok = T.TextTokenizer.from_dir(make_folder(str(tmp_path), "f", small_src, V_IN))
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assistant, nl = tok.token_to_id("assistant"), tok.token_to_id("\u010a")  # byte-level "\n"
    assert None not in (im_start, im_end, assistant, nl)
    assert im_start == text_tokenizer.convert_tokens_to_ids("<|im_start|>")
    role = tok.encode("<|im_start|>assistant\n")
    assert role == [im_start, assistant, nl] and len(role) == 3
    body = tok.encode("Hello world.")
    ids = tok.encode(T.assistant_text("Hello world."))
    assert ids[:3] == role and ids[3:-5] == body
    assert ids[-5:] == [im_end, nl, im_start, assistant, nl]
    ref = tok.encode(T.ref_text("Hello world."))
    assert ref[:3] == role and ref[3:-2] == body and ref[-2:] == [im_end, nl]
    assert tok.encode(T.instruct_text("Hi"))[:3] == [im_start, tok.token_to_id("user"), nl]
    assert tok.token_to_id("<|tts_pad|>") == text_tokenizer.convert_tokens_to_ids("<|tts_pad|>")
    assert tok.token_to_id("no-such-token") is None
    assert tok.decode(ids) == T.assistant_text("Hello world.")
    assert len(tok) == len(text_tokenizer) and tok.vocab_size == text_tokenizer.vocab_size


# ---------------------------------------------------------------------------------------------------
# parity: tiny tokenizer (no Mistral patch possible)

def _flags_edit(c):
    """tokenizer_config flags that disagree with tokenizer.json: transformers re-adds every serialized
    token, so these win (lstrip eats the space before <|im_end|>; <|tts_pad|> becomes non-special)."""
    for v in c["added_tokens_decoder"].values():
        if v["content"] == "<|im_end|>":
            v["lstrip"] = True
        if v["content"] == "<|tts_pad|>":
            v["special"] = False
    c["additional_special_tokens"].remove("<|tts_pad|>")


def _legacy_edit(c):
    """Old-style folder: no added_tokens_decoder (added_tokens.json + special_tokens_map.json instead)."""
    c.pop("added_tokens_decoder")


def _split_special_edit(c):
    c["split_special_tokens"] = True


@pytest.mark.parametrize("json_file", [True, False], ids=["tokenizer_json", "vocab_merges"])
@pytest.mark.parametrize("edit", [None, _flags_edit, _legacy_edit, _split_special_edit],
                         ids=["plain", "flags", "legacy", "split_special"])
def test_parity_small(tmp_path, auto_processor, small_src, json_file, edit):
    folder = make_folder(str(tmp_path), "f", small_src, V_IN, json_file=json_file,
                         edit_tok_config=edit)
    proc, state = load_official(auto_processor, folder)
    ours = T.TextTokenizer.from_dir(folder)
    assert not ours.mistral_regex and not is_mistral_official(proc)
    assert_same(ours, proc, state, all_strings())
    if edit is _flags_edit:  # the edit really changes tokenization
        assert ours.encode("a <|im_end|>") == ours.encode("a<|im_end|>")
        assert ours.encode("<|tts_pad|>") == [ours.token_to_id("<|tts_pad|>")]
    if edit is _split_special_edit:
        assert ours.token_to_id("<|im_start|>") not in ours.encode("<|im_start|>")


def test_small_json_and_vocab_folders_agree_on_nfc_text(tmp_path, small_src):
    """Without tokenizer.json transformers adds an NFC normalizer (Qwen2Converter); the tiny
    tokenizer.json has none. Both agree on NFC text."""
    a = T.TextTokenizer.from_dir(make_folder(str(tmp_path), "a", small_src, V_IN))
    b = T.TextTokenizer.from_dir(make_folder(str(tmp_path), "b", small_src, V_IN, json_file=False))
    nfc = [s for s in HARD if unicodedata.normalize("NFC", s) == s]
    assert [a.encode(s) for s in nfc] == [b.encode(s) for s in nfc]
    nfd = unicodedata.normalize("NFD", "Ünïcödé")
    assert b.encode(nfd) == b.encode("Ünïcödé") != a.encode(nfd)


# ---------------------------------------------------------------------------------------------------
# parity: big tokenizer (base vocab > 100000), the fix_mistral_regex condition

@pytest.mark.parametrize("name,json_file", BIG_CASES,
                         ids=[f"{n}-{'tokenizer_json' if j else 'vocab_merges'}" for n, j in BIG_CASES])
def test_parity_big(big_folder, name, json_file):
    folder, proc, state = big_folder(name, json_file)
    patched = VARIANTS[name][1]
    assert proc.tokenizer.vocab_size > 100_000
    assert is_mistral_official(proc) == patched  # the official behaviour we expect
    ours = T.TextTokenizer.from_dir(folder)
    assert ours.mistral_regex == patched
    assert_same(ours, proc, state, all_strings())


def test_big_patch_changes_ids(big_folder):
    """The condition matters: the official ids differ between versions inside / outside the range."""
    f_in, p_in, _ = big_folder("v4573")
    f_out, p_out, _ = big_folder("v4571")
    changed = [s for s in MISTRAL_SENSITIVE if official_ids(p_in, s) != official_ids(p_out, s)]
    assert changed == MISTRAL_SENSITIVE
    assert len(official_ids(p_out, "HelloWorld")) == 1 and len(official_ids(p_in, "HelloWorld")) == 2
    for s in ["Hello world.", "don't", "I'M", "你好世界", "0123456789"]:
        assert official_ids(p_in, s) == official_ids(p_out, s)
    # forcing the flag reproduces the other behaviour (official loaded by hub id = no patch)
    forced = T.TextTokenizer.from_dir(f_in, mistral_regex=False)
    assert [forced.encode(s) for s in HARD] == [official_ids(p_out, s) for s in HARD]
    forced = T.TextTokenizer.from_dir(f_out, mistral_regex=True)
    assert [forced.encode(s) for s in HARD] == [official_ids(p_in, s) for s in HARD]


def test_mistral_regex_applies_rules():
    f = T.mistral_regex_applies
    big, qt = 151643, "qwen3_tts"
    assert f({"transformers_version": "4.57.3", "model_type": qt}, big)
    assert not f({"transformers_version": "4.57.3", "model_type": qt}, 100_000)  # needs > 100000
    assert f({"transformers_version": "4.57.3", "model_type": qt}, 100_001)
    assert not f({"transformers_version": "4.57.2", "model_type": qt}, big)
    assert f({"transformers_version": "4.57.2", "model_type": "pixtral"}, big)
    assert f({"transformers_version": "4.57.2"}, big)
    assert f({"transformers_version": "", "model_type": qt}, big)
    assert f({"transformers_version": "4.99.0", "model_type": qt}, big)
    assert not f({"transformers_version": "5.0.0", "model_type": qt}, big)
    assert f({"transformers_version": "5.0.0rc1", "model_type": qt}, big)
    assert not f(None, big)
    # hub ids: only repos tagged base_model:...mistralai
    assert not f({"transformers_version": "4.57.3", "model_type": qt}, big, is_local=False)
    assert f(None, big, is_local=False, hub_tagged_mistral=True)
    assert f({"transformers_version": "4.57.1", "model_type": qt}, big, is_local=False,
             hub_tagged_mistral=True)
    assert not f({"transformers_version": "5.1.0"}, big, is_local=False, hub_tagged_mistral=True)


def test_runtime_module_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, qwen3_tts_jax.text as t; t.TextTokenizer; "
            "print(sorted(m for m in ('torch', 'transformers', 'qwen_tts') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("name,content", [("tokenizer.json", '{"version": "1.0", '),
                                          ("tokenizer.json", '{"model": 3}'),
                                          ("tokenizer_config.json", "{")])
def test_corrupt_tokenizer_files_name_the_file(tmp_path, small_src, name, content):
    from qwen3_tts_jax.config import ConfigError

    shutil.copytree(small_src, tmp_path / "tok")
    (tmp_path / "tok" / name).write_text(content)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "tok" / name))):
        T.TextTokenizer.from_dir(str(tmp_path / "tok"))


# ---------------------------------------------------------------------------------------------------
# text that arrives in pieces (server sessions, the API's text iterators)

FEED_TEXTS = [t for t in HARD if t.strip()] + [
    "你好，世界。今天天气很好！我们去公园散步吧？", "「こんにちは」、世界！カタカナ・ひらがな。",
    "数字3，字母a，符号＋和€，表情😀之后", "mixed 中文，English, 日本語。done",
    # newlines join the whitespace before them and the punctuation before them
    "Hello.\nWorld\n\nfoo.\n\nbar \n x\r\ny", "a  \n b\t\t\nc", "Hi   there\n\n\n",
    "你好。\n世界\u3000今天", "a\u00a0b\x1cc. \x0bd", "end.  \n"]


@pytest.fixture(scope="module")
def merging_src(tmp_path_factory):
    """A tokenizer whose merges were learnt on whole strings, with no pre-split: they join
    letters, punctuation, spaces and newlines across every pre-token boundary, so tokenizing a
    text cut where the pre-split does not end a piece gives other tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # the chat template's words whole, as in the real vocabulary (TextFeed takes [3:-5])
    tok.train_from_iterator(FEED_TEXTS * 20 + ["assistant", "user"] * 200, trainers.BpeTrainer(
        vocab_size=1500, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None,
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    path = str(tmp_path_factory.mktemp("text_merging_src"))
    fast.save_pretrained(path)
    return path


@pytest.mark.parametrize("src", ["big", "merging"])
@pytest.mark.parametrize("mistral", [False, True])
def test_text_feed_commits_a_prefix_of_the_whole_texts_tokens(big_src, merging_src, src,
                                                              mistral):
    """`TextFeed` tokenizes text that is still arriving only up to where both pre-tokenizer
    splits end a piece whatever follows: after every piece of random splits its tokens are the
    first tokens of the whole text, and the whole text's tokens at the end (two tokenizers whose
    merges cross the pre-split's boundaries, so a wrong cut would show: "Hello.|\n" where ".\n"
    is one piece, "\n|\n", camel case, contractions, combining marks). Chinese and Japanese,
    without spaces, commit at their punctuation before the text ends."""
    import random

    from qwen3_tts_jax.text_feed import TextFeed

    tok = T.TextTokenizer.from_dir(big_src if src == "big" else merging_src,
                                   mistral_regex=mistral)
    assert len(tok.encode(T.assistant_text(""))) == 8     # the template's 3 + 5 tokens
    rng = random.Random(0)
    for text in FEED_TEXTS:
        whole = tok.encode(T.assistant_text(text))[3:-5]
        splits = [sorted(rng.sample(range(1, len(text)), min(k, len(text) - 1)))
                  for k in (1, 2, 5, 5, 5, 5, 5, 5, len(text))]
        for cuts in splits + [[len(text)]]:      # the last: all of it, then "end" alone
            feed = TextFeed(tok, build=None)
            for a, b in zip([0] + cuts, cuts + [len(text)]):
                feed.push(text[a:b], final=a == len(text))
                assert feed.tokens == whole[:len(feed.tokens)], (text, text[:b])
            if not feed.final:
                feed.push("", final=True)
            assert feed.tokens == whole, text
    feed = TextFeed(tok, build=None)
    feed.push("你好，世界。今天天")
    assert feed.tokens == tok.encode(T.assistant_text("你好，世界"))[3:-5]
    feed.push("<|im_en")           # an ASCII special token still arriving is not cut into
    assert feed.tokens == tok.encode(T.assistant_text("你好，世界"))[3:-5]
