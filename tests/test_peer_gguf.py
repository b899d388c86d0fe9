"""benchmarks/peer_gguf.py (the converter to qwentts.cpp's GGUF files): every weight of an
official-layout checkpoint gets exactly one of the peer's names, without the peer or `gguf`."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import peer_gguf  # noqa: E402


def test_every_weight_has_one_peer_name(make_checkpoint):
    folder = make_checkpoint("cv_proj")
    talker = peer_gguf.SafeTensors(os.path.join(folder, "model.safetensors"))
    names = peer_gguf.plan(talker, peer_gguf.talker_name)
    assert sum(len(v) for v in names.values()) == len(talker.keys())
    assert all(len(v) == 1 for v in names.values())          # one tensor per name
    cfg = json.load(open(os.path.join(folder, "config.json")))["talker_config"]
    groups = cfg["num_code_groups"] - 1
    for g in range(groups):
        assert f"code_pred.lm_head.{g}.weight" in names
        assert f"code_pred.codec_embd.{g}.weight" in names
    assert len([n for n in names if n.startswith("talker.blk.")]) == 11 * cfg["num_hidden_layers"]

    codec = peer_gguf.SafeTensors(os.path.join(folder, "speech_tokenizer", "model.safetensors"))
    names = peer_gguf.plan(codec, peer_gguf.codec_name)
    books = {n: v for n, v in names.items() if n.endswith(".codebook")}
    assert len(books) == 16 and all(len(v) == 2 for v in books.values())
    dropped = [k for k in codec.keys() if peer_gguf.codec_name(k) is None]
    assert all(k.startswith("encoder.") or k.endswith(".input_proj.weight") for k in dropped)
    decoder = [k for k in codec.keys() if k.startswith("decoder.")]
    assert sum(len(v) for v in names.values()) + len(dropped) == len(codec.keys())
    assert len(decoder) - 2 == sum(len(v) for v in names.values())   # 2 input projections


def test_storage_types():
    assert peer_gguf.storage("talker.blk.0.attn_q.weight", (2048, 1024), "Q8_0") == "Q8_0"
    assert peer_gguf.storage("talker.blk.0.attn_norm.weight", (1024,), "Q8_0") == "F32"
    assert peer_gguf.storage("tok_dec.dec.1.conv_t.weight", (1536, 768, 16), "Q8_0") == "F16"
    assert peer_gguf.storage("tok_dec.vq_rest.3.codebook", (2048, 256), "Q8_0") == "F32"
    assert peer_gguf.storage("talker.blk.0.attn_q.weight", (2048, 1024), "F32") == "F32"


def test_prompt_ids():
    cfg = {"im_start_token_id": 151644, "im_end_token_id": 151645}
    ids = peer_gguf.prompt_ids(cfg, "Hi.\n")
    assert ids[:3] == [151644, 77091, 198] and ids[-5:] == [151645, 198, 151644, 77091, 198]
    symbols, _ = peer_gguf.byte_symbols()
    assert [symbols[i] for i in ids[3:-5]] == ["H", "i", ".", "Ċ"]
