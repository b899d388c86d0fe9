"""The 12 Hz speech tokenizer (codec): 24 kHz audio <-> 16 codes per 12.5 Hz frame.

    from qwen3_tts_jax.codec import SpeechTokenizer
    tok = SpeechTokenizer.from_pretrained("path/to/speech_tokenizer")
    wavs, sr = tok.decode(codes_Tx16)       # ([float32 (1920 * T,)], 24000)
    codes = tok.encode("ref.wav")[0]        # (frames, 16) int32 (the Mimi encoder, encoder.py)

decoder.py holds the pure functions: `decode` (whole utterance), `decode_stages` (every stage, for
parity tests), `chunked_decode` (the official 300-frame chunking, traceable, for use inside a
larger jit) and `stream_decode` (the same decoder with its state carried between calls).
streaming.py holds `StreamDecoder` (incremental decoding of several streams, equal to the whole
decode). tokenizer.py holds the host side: input checks, `bucketed_decode` (the same chunking
window by window, with bucketed window lengths: few compiled programs) and `SpeechTokenizer`.
"""
from .config import DecoderConfig, SpeechTokenizerConfig, parse_config
from . import decoder
from .decoder import chunked_decode, decode, decode_stages, stream_decode
from .streaming import PrefixStates, StreamDecoder
from .encoder import EncoderConfig, parse_encoder_config
from .tokenizer import (SpeechTokenizer, bucketed_decode, check_codes, chunk_plan, decode_padded,
                        encode_audio, frame_bucket)

__all__ = ["SpeechTokenizer", "StreamDecoder", "PrefixStates", "stream_decode", "SpeechTokenizerConfig",
           "DecoderConfig", "parse_config", "decoder", "decode", "decode_stages", "chunked_decode",
           "bucketed_decode", "chunk_plan",
           "decode_padded", "check_codes", "frame_bucket", "EncoderConfig", "encode_audio",
           "parse_encoder_config"]
