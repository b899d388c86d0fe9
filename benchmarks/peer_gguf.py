"""Our official-layout checkpoint (safetensors) -> the GGUF files that qwentts.cpp loads.

    /work/peer-venv/bin/python benchmarks/peer_gguf.py CHECKPOINT OUT_DIR --types F32,Q8_0

writes OUT_DIR/talker-{TYPE}.gguf and OUT_DIR/codec-{TYPE}.gguf. A benchmark tool, not part of the
package: it needs the `gguf` package (run it with the peer's virtual environment), the runtime does
not. The layout follows what the peer's native library reads (tensor names and metadata keys as its
C++ loader looks them up):

  talker GGUF   architecture "qwen3-tts": the talker's 28 layers as `talker.blk.{i}.*`, the code
                predictor's as `code_pred.blk.{i}.*`, its per-group embeddings and heads as
                `code_pred.codec_embd.{g}` / `code_pred.lm_head.{g}`, the config as
                `qwen3-tts.*` keys, and a byte-level BPE vocabulary (`tokenizer.ggml.*`).
  codec GGUF    architecture "qwen3-tts-tokenizer": the 12 Hz decoder as `tok_dec.*`, each RVQ
                codebook stored already divided by its clamped usage count (what the official
                `EuclideanCodebook.decode` computes), the config as `qwen3-tts-tokenizer.*` keys.

Q8_0 follows the peer's own quantization policy: every matrix (2 or more dimensions) becomes Q8_0,
embeddings included, except the RVQ codebooks and the projections around them, the snake
activation parameters and the speaker encoder's last layer (kept float32), and tensors whose rows
are not a multiple of 32 (convolution kernels: float16). Vectors stay float32.

The vocabulary. The random-weight checkpoints carry a toy tokenizer, so the peer gets a synthetic
vocabulary of the talker's text size (151936) in which a prompt's ids are known in advance: the
256 byte symbols of byte-level BPE at ids 0..255 (GPT-2 order, so newline is 198 as in Qwen's
vocabulary), the chat specials at the ids the config names, "assistant" at 77091 (one merge chain
builds it; its partial words "as" .. "assistan" at 77084..77090), every other id a placeholder.
`prompt_ids(text)` gives the ids the peer's tokenizer produces for a text without the letter pair
"as"; `bench_peer_cpu.py` gives ours a tokenizer over the same vocabulary.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys

import numpy as np

ASSISTANT_ID = 77091
ENDOFTEXT_ID = 151643
RVQ_EPS = 1e-5          # the official EuclideanCodebook's clamp of the usage counts
Q8_BLOCK = 32

# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TALKER = {
    "talker.model.codec_embedding.weight": "talker.codec_embd.weight",
    "talker.model.text_embedding.weight": "talker.text_embd.weight",
    "talker.model.norm.weight": "talker.output_norm.weight",
    "talker.codec_head.weight": "talker.codec_head.weight",
    "talker.code_predictor.model.norm.weight": "code_pred.output_norm.weight",
    "talker.code_predictor.small_to_mtp_projection.weight": "code_pred.mtp_proj.weight",
    "talker.code_predictor.small_to_mtp_projection.bias": "code_pred.mtp_proj.bias",
}


def talker_name(name: str) -> str:
    """The peer's name for one tensor of the official model.safetensors (CustomVoice/VoiceDesign
    talker; Base checkpoints' speaker encoder is not converted)."""
    if name in _TALKER:
        return _TALKER[name]
    m = re.fullmatch(r"talker\.text_projection\.linear_fc([12])\.(weight|bias)", name)
    if m:
        return f"talker.text_proj.fc{m[1]}.{m[2]}"
    m = re.fullmatch(r"talker\.(model|code_predictor\.model)\.layers\.(\d+)\.(.+)", name)
    if m and m[3] in _LAYER:
        return f"{'talker' if m[1] == 'model' else 'code_pred'}.blk.{m[2]}.{_LAYER[m[3]]}"
    m = re.fullmatch(r"talker\.code_predictor\.model\.codec_embedding\.(\d+)\.weight", name)
    if m:
        return f"code_pred.codec_embd.{m[1]}.weight"
    m = re.fullmatch(r"talker\.code_predictor\.lm_head\.(\d+)\.weight", name)
    if m:
        return f"code_pred.lm_head.{m[1]}.weight"
    raise KeyError(f"no peer name for talker tensor {name}")


def codec_name(name: str) -> str | None:
    """The peer's name for one tensor of the official speech_tokenizer/model.safetensors (decoder
    side). None: not stored (the encoder, which the peer loads only to clone voices, and the
    decoder's RVQ input projections, unused when decoding). Codebooks map to
    `tok_dec.vq_{first,rest}.{i}.codebook`, fused from their two tensors."""
    p = name.split(".")
    if name.startswith("encoder."):
        return None
    if name.startswith("decoder.quantizer."):
        side = p[2][1:]                                  # rvq_first -> vq_first
        if p[3] == "output_proj":
            return f"tok_dec.{side}.output_proj.weight"
        if p[3] == "input_proj":
            return None
        if p[3:5] == ["vq", "layers"] and p[6] == "_codebook" \
                and p[7] in ("embedding_sum", "cluster_usage"):
            return f"tok_dec.{side}.{p[5]}.codebook"
    elif name.startswith("decoder.pre_conv.conv."):
        return f"tok_dec.pre_conv.{p[-1]}"
    elif name.startswith("decoder.pre_transformer."):
        if p[2] in ("input_proj", "output_proj", "norm"):
            return f"tok_dec.pre_tfm.{p[2]}.{p[-1]}"
        rest = ".".join(p[4:])
        scales = {"self_attn_layer_scale.scale": "attn_scale", "mlp_layer_scale.scale": "ffn_scale"}
        if p[2] == "layers" and rest in scales:
            return f"tok_dec.pre_tfm.blk.{p[3]}.{scales[rest]}"
        if p[2] == "layers" and rest in _LAYER:
            return f"tok_dec.pre_tfm.blk.{p[3]}.{_LAYER[rest]}"
    elif name.startswith("decoder.upsample."):
        i, part = p[2], p[3]
        if part == "0":                                  # the transposed convolution
            return f"tok_dec.upsample.{i}.conv.{p[-1]}"
        if part == "1" and p[4] in ("dwconv", "norm", "pwconv1", "pwconv2"):
            return f"tok_dec.upsample.{i}.{p[4]}.{p[-1]}"
        if part == "1" and p[4] == "gamma":
            return f"tok_dec.upsample.{i}.gamma"
    elif name.startswith("decoder.decoder."):
        i = int(p[2])
        if i in (0, 6):                                  # first and last convolutions
            return f"tok_dec.dec.{i}.conv.{p[-1]}"
        if i == 5:                                       # the last snake
            return f"tok_dec.dec.5.snake.{p[-1]}"
        j = int(p[4])                                    # decoder blocks 1..4
        if j == 0:
            return f"tok_dec.dec.{i}.snake.{p[-1]}"
        if j == 1:
            return f"tok_dec.dec.{i}.conv_t.{p[-1]}"
        if j in (2, 3, 4) and p[5] in ("act1", "act2", "conv1", "conv2"):
            return f"tok_dec.dec.{i}.res.{j - 2}.{p[5]}.{p[-1]}"
    raise KeyError(f"no peer name for codec tensor {name}")


def keeps_float(name: str) -> bool:
    """Tensors the peer's quantizer never quantizes (it keeps them in the source type)."""
    return (".snake." in name or ".act1." in name or ".act2." in name
            or name.startswith(("tok_dec.vq_", "tok_enc.vq_")) or name == "spk_enc.fc.weight")


# ------------------------------------------------------------------------------------------------
# safetensors, read lazily (no dependency: an 8-byte header length, a JSON header, raw data)
# ------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class SafeTensors:
    def __init__(self, path: str):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.base = 8 + n
        self.path = path

    def keys(self):
        return list(self.header)

    def shape(self, key) -> tuple:
        return tuple(self.header[key]["shape"])

    def get(self, key) -> np.ndarray:
        h = self.header[key]
        lo, hi = h["data_offsets"]
        raw = np.fromfile(self.path, dtype=_ST_DTYPES[h["dtype"]], count=(hi - lo) //
                          np.dtype(_ST_DTYPES[h["dtype"]]).itemsize, offset=self.base + lo)
        if h["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape(h["shape"])


# ------------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------------

def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-symbol table, in its order (printable bytes first)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
                 + list(range(0xAE, 0xFF + 1)))
    order = printable + [b for b in range(256) if b not in printable]
    symbol = {b: chr(b) for b in printable}
    symbol.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256)
                                                           if b not in printable)})
    return [symbol[b] for b in order], order


def vocabulary(cfg: dict) -> tuple[list[str], list[str]]:
    """(tokens, merges) of the synthetic vocabulary (module docstring)."""
    size = cfg["talker_config"]["text_vocab_size"]
    symbols, _ = byte_symbols()
    tokens = symbols + [f"<|peer-{i}|>" for i in range(len(symbols), size)]
    specials = {"<|endoftext|>": ENDOFTEXT_ID, "<|im_start|>": cfg["im_start_token_id"],
                "<|im_end|>": cfg["im_end_token_id"], "<|tts_pad|>": cfg["tts_pad_token_id"],
                "<|tts_text_bos|>": cfg["tts_bos_token_id"],
                "<|tts_text_eod|>": cfg["tts_eos_token_id"], "assistant": ASSISTANT_ID}
    for text, i in specials.items():
        tokens[i] = text
    word = "assistant"
    merges = [f"{word[:k]} {word[k]}" for k in range(1, len(word))]
    for k in range(2, len(word)):               # the chain's partial words, just below it
        tokens[ASSISTANT_ID - len(word) + k] = word[:k]
    return tokens, merges


def prompt_ids(cfg: dict, text: str) -> list[int]:
    """The ids the peer's tokenizer gives "<|im_start|>assistant\\n{text}<|im_end|>\\n<|im_start|>
    assistant\\n" under the synthetic vocabulary: one id per UTF-8 byte of the text."""
    if "as" in text or "<|" in text:
        raise ValueError("the text must not contain 'as' (the merge chain of 'assistant') or '<|'")
    _, order = byte_symbols()
    index = {b: i for i, b in enumerate(order)}
    newline = index[ord("\n")]
    head = [cfg["im_start_token_id"], ASSISTANT_ID, newline]
    tail = [cfg["im_end_token_id"], newline, cfg["im_start_token_id"], ASSISTANT_ID, newline]
    return head + [index[b] for b in text.encode("utf-8")] + tail


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------

def talker_metadata(w, cfg: dict, gen: dict) -> None:
    t, cp = cfg["talker_config"], cfg["talker_config"]["code_predictor_config"]
    a = "qwen3-tts"
    w.add_string("general.name", f"random {cfg['tts_model_size']} {cfg['tts_model_type']}")
    w.add_string(f"{a}.tokenizer_type", cfg["tokenizer_type"])
    w.add_string(f"{a}.model_size", cfg["tts_model_size"])
    w.add_string(f"{a}.model_type", cfg["tts_model_type"])
    w.add_uint32(f"{a}.num_code_groups", t["num_code_groups"])
    for part, c in (("talker", t), ("code_pred", cp)):
        w.add_uint32(f"{a}.{part}.embedding_length", c["hidden_size"])
        w.add_uint32(f"{a}.{part}.feed_forward_length", c["intermediate_size"])
        w.add_uint32(f"{a}.{part}.block_count", c["num_hidden_layers"])
        w.add_uint32(f"{a}.{part}.attention.head_count", c["num_attention_heads"])
        w.add_uint32(f"{a}.{part}.attention.head_count_kv", c["num_key_value_heads"])
        w.add_uint32(f"{a}.{part}.attention.key_length", c["head_dim"])
        w.add_uint32(f"{a}.{part}.vocab_size", c["vocab_size"])
        w.add_uint32(f"{a}.{part}.context_length", c["max_position_embeddings"])
        w.add_float32(f"{a}.{part}.rope.freq_base", float(c["rope_theta"]))
        w.add_float32(f"{a}.{part}.attention.layer_norm_rms_epsilon", float(c["rms_norm_eps"]))
    w.add_uint32(f"{a}.talker.text_vocab_size", t["text_vocab_size"])
    w.add_uint32(f"{a}.talker.text_hidden_size", t["text_hidden_size"])
    w.add_uint32(f"{a}.talker.position_id_per_seconds", t["position_id_per_seconds"])
    rope = t.get("rope_scaling") or {}
    if "mrope_section" in rope:
        w.add_array(f"{a}.talker.rope.mrope_section", list(rope["mrope_section"]))
        w.add_bool(f"{a}.talker.rope.mrope_interleaved", bool(rope.get("interleaved", False)))
    for key, src in (("pad_id", "codec_pad_id"), ("bos_id", "codec_bos_id"),
                     ("eos_id", "codec_eos_token_id"), ("think_id", "codec_think_id"),
                     ("nothink_id", "codec_nothink_id"), ("think_bos_id", "codec_think_bos_id"),
                     ("think_eos_id", "codec_think_eos_id")):
        w.add_uint32(f"{a}.codec.{key}", t[src])
    langs = t.get("codec_language_id") or {}
    w.add_array(f"{a}.codec.language_names", list(langs))
    w.add_array(f"{a}.codec.language_ids", [int(v) for v in langs.values()])
    speakers = t.get("spk_id") or {}
    if speakers:
        dialect = t.get("spk_is_dialect") or {}
        w.add_array(f"{a}.codec.speaker_names", list(speakers))
        w.add_array(f"{a}.codec.speaker_ids", [int(v) for v in speakers.values()])
        w.add_array(f"{a}.codec.speaker_dialects",
                    [d if isinstance(d := dialect.get(k), str) else "" for k in speakers])
    for key, src in (("im_start_id", "im_start_token_id"), ("im_end_id", "im_end_token_id"),
                     ("tts_pad_id", "tts_pad_token_id"), ("tts_bos_id", "tts_bos_token_id"),
                     ("tts_eos_id", "tts_eos_token_id")):
        w.add_uint32(f"{a}.text.{key}", cfg[src])
    for key, src, kind in (("do_sample", "do_sample", bool), ("top_k", "top_k", int),
                           ("top_p", "top_p", float), ("temperature", "temperature", float),
                           ("repetition_penalty", "repetition_penalty", float),
                           ("subtalker_do_sample", "subtalker_dosample", bool),
                           ("subtalker_top_k", "subtalker_top_k", int),
                           ("subtalker_top_p", "subtalker_top_p", float),
                           ("subtalker_temperature", "subtalker_temperature", float),
                           ("max_new_tokens", "max_new_tokens", int)):
        if src in gen:
            add = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32}[kind]
            add(f"generation.{key}", kind(gen[src]))
    tokens, merges = vocabulary(cfg)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.eos_token_id", ENDOFTEXT_ID)


def codec_metadata(w, cfg: dict) -> None:
    a = "qwen3-tts-tokenizer"
    d, e = cfg["decoder_config"], cfg["encoder_config"]
    w.add_string("general.name", "random Qwen3-TTS-Tokenizer-12Hz (decoder only)")
    for key in ("input_sample_rate", "output_sample_rate", "decode_upsample_rate",
                "encode_downsample_rate", "encoder_valid_num_quantizers"):
        w.add_uint32(f"{a}.{key}", cfg[key])
    for key in ("latent_dim", "codebook_dim", "codebook_size", "decoder_dim", "hidden_size",
                "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "num_quantizers", "num_semantic_quantizers", "sliding_window"):
        w.add_uint32(f"{a}.decoder.{key}", d[key])
    w.add_float32(f"{a}.decoder.rms_norm_eps", float(d["rms_norm_eps"]))
    w.add_float32(f"{a}.decoder.rope_theta", float(d["rope_theta"]))
    w.add_float32(f"{a}.decoder.layer_scale_initial_scale", float(d["layer_scale_initial_scale"]))
    w.add_array(f"{a}.decoder.upsample_rates", list(d["upsample_rates"]))
    w.add_array(f"{a}.decoder.upsampling_ratios", list(d["upsampling_ratios"]))
    w.add_uint32(f"{a}.decoder.vector_quantization_hidden_dim",
                 d["vector_quantization_hidden_dimension"])
    # the codebook vectors' width before the output projection (the official VQ's codebook_dim/2)
    w.add_uint32(f"{a}.decoder.codebook_dim_internal", d["codebook_dim"] // 2)
    # the encoder's shape (the peer loads its encoder only to clone voices; none is stored here)
    for key in ("num_filters", "kernel_size", "last_kernel_size", "residual_kernel_size",
                "num_residual_layers", "dilation_growth_rate", "compress", "hidden_size",
                "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "codebook_dim", "codebook_size", "num_quantizers",
                "num_semantic_quantizers"):
        w.add_uint32(f"{a}.encoder.{key}", e[key])
    w.add_array(f"{a}.encoder.upsampling_ratios", list(e["upsampling_ratios"]))
    w.add_float32(f"{a}.encoder.norm_eps", float(e["norm_eps"]))
    w.add_float32(f"{a}.encoder.rope_theta", float(e["rope_theta"]))
    w.add_float32(f"{a}.encoder.layer_scale_initial_scale", float(e["layer_scale_initial_scale"]))
    w.add_uint32(f"{a}.encoder.vector_quantization_hidden_dim",
                 e["vector_quantization_hidden_dimension"])


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------

def plan(st: SafeTensors, rename) -> dict[str, list[str]]:
    """peer name -> the source tensors it is made of (one, or a codebook's two), in file order."""
    out: dict[str, list[str]] = {}
    for key in st.keys():
        name = rename(key)
        if name is not None:
            out.setdefault(name, []).append(key)
    return out


def storage(name: str, shape: tuple, qtype: str) -> str:
    """F32, F16 or Q8_0: the type one tensor is stored in for a file of type `qtype`."""
    if qtype == "F32" or len(shape) < 2 or keeps_float(name):
        return "F32"
    return "Q8_0" if shape[-1] % Q8_BLOCK == 0 else "F16"


def tensor_value(st: SafeTensors, sources: list[str]) -> np.ndarray:
    if len(sources) == 1:
        return st.get(sources[0])
    parts = {k.rsplit(".", 1)[-1]: k for k in sources}
    usage = np.maximum(st.get(parts["cluster_usage"]), RVQ_EPS)
    return st.get(parts["embedding_sum"]) / usage[:, None]


def write(path: str, arch: str, st: SafeTensors, names: dict[str, list[str]], qtype: str,
          metadata) -> None:
    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(path, arch)
    metadata(w)
    kinds = {}
    for name, sources in names.items():
        shape = st.shape(sources[0])
        if len(sources) == 2:                     # a codebook: [codebook_size, dim]
            shape = st.shape([s for s in sources if s.endswith("embedding_sum")][0])
        kinds[name] = kind = storage(name, shape, qtype)
        if kind == "Q8_0":
            byte_shape = quant_shape_to_byte_shape(shape, q8)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=q8)
        else:
            dt = np.dtype(np.float16 if kind == "F16" else np.float32)
            w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, sources in names.items():
        x = tensor_value(st, sources)
        kind = kinds[name]
        if kind == "Q8_0":
            x = quantize(x, q8)
        elif kind == "F16":
            x = x.astype(np.float16)
        w.write_tensor_data(np.ascontiguousarray(x))
    w.close()
    counts = {k: sum(v == k for v in kinds.values()) for k in sorted(set(kinds.values()))}
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.0f} MiB; tensors {counts})",
          file=sys.stderr)


def convert(folder: str, out_dir: str, qtype: str) -> tuple[str, str]:
    """Write talker-{qtype}.gguf and codec-{qtype}.gguf under out_dir (kept when present)."""
    assert qtype in ("F32", "Q8_0"), qtype
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    gen_path = os.path.join(folder, "generation_config.json")
    gen = json.load(open(gen_path)) if os.path.exists(gen_path) else {}
    codec_dir = os.path.join(folder, "speech_tokenizer")
    with open(os.path.join(codec_dir, "config.json")) as f:
        codec_cfg = json.load(f)
    talker_path = os.path.join(out_dir, f"talker-{qtype}.gguf")
    codec_path = os.path.join(out_dir, f"codec-{qtype}.gguf")
    if not os.path.exists(talker_path):
        st = SafeTensors(os.path.join(folder, "model.safetensors"))
        write(talker_path + ".part", "qwen3-tts", st, plan(st, talker_name), qtype,
              lambda w: talker_metadata(w, cfg, gen))
        os.replace(talker_path + ".part", talker_path)
    if not os.path.exists(codec_path):
        st = SafeTensors(os.path.join(codec_dir, "model.safetensors"))
        write(codec_path + ".part", "qwen3-tts-tokenizer", st, plan(st, codec_name), qtype,
              lambda w: codec_metadata(w, codec_cfg))
        os.replace(codec_path + ".part", codec_path)
    return talker_path, codec_path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir")
    ap.add_argument("--types", default="F32,Q8_0")
    args = ap.parse_args()
    for qtype in args.types.split(","):
        print(*convert(args.checkpoint, args.out_dir, qtype))


if __name__ == "__main__":
    main()
