"""A cloned voice given in the speech request itself (`ref_audio` in base64 with `ref_text`, or
`x_vector_only_mode`: vLLM-Omni's fields) on a Base checkpoint: the audio equals that of the same
voice registered first; the same reference sent again is encoded once; every bad field is a 400
(or 413) naming it; a path or URL is never read; a text session takes it too; other checkpoints
refuse it.
Also the bounds around cloned voices: references encoded at once, registered voices kept.
"""
import asyncio
import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from qwen3_tts_jax import Qwen3TTS  # noqa: E402
from qwen3_tts_jax.server.app import Server, ServerOptions, create_app  # noqa: E402
from qwen3_tts_jax.server.errors import ApiError  # noqa: E402
from test_audio import write_speech  # noqa: E402
from test_server import TOKENS, Running, get, multipart, post  # noqa: E402

GREEDY = {"do_sample": False, "subtalker_dosample": False, "max_new_tokens": TOKENS}
TRANSCRIPT = "Hello world."


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("base"))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    path = write_speech(tmp_path_factory.mktemp("ref") / "ref.wav", 22050)
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def server(base, ref, tmp_path_factory):
    s = Running(create_app(base, ServerOptions(
        model_name="tiny", voices_dir=str(tmp_path_factory.mktemp("voices")),
        max_new_tokens=TOKENS, min_prompt_bucket=64, batch_buckets=(4,), max_batch_size=4)))
    for name, fields in (("me", {"transcript": TRANSCRIPT}), ("xvec", {}),
                         ("tail", {"transcript": TRANSCRIPT, "ref_tail_silence": "0.5"})):
        code, out = multipart(s.url + "/v1/audio/voices", {"name": name, **fields},
                              {"audio_sample": ("ref.wav", ref)})
        assert code == 200, out
    yield s
    s.stop()


def speak(server, **fields):
    body = {"model": "tiny", "input": "A short line to say.", "response_format": "pcm",
            **GREEDY, **fields}
    return post(server.url + "/v1/audio/speech", body)


def test_a_voice_in_the_request_speaks_as_the_registered_one(server, ref):
    b64 = base64.b64encode(ref).decode()
    for registered, inline in (("me", {"ref_text": TRANSCRIPT}),
                               ("xvec", {"x_vector_only_mode": True})):
        code, _, want = speak(server, voice=registered)
        assert code == 200
        stats = get(server.url + "/health")["stats"]
        for audio in (b64, "data:audio/wav;base64," + b64):
            code, _, got = speak(server, ref_audio=audio, **inline)
            assert code == 200, got
            assert got == want, (registered, audio[:30])
        after = get(server.url + "/health")["stats"]
        # encoded once: the second request (the data URL of the same bytes) reused it
        assert after["inline_voices_encoded"] == stats["inline_voices_encoded"] + 1
        assert after["inline_voices_reused"] == stats["inline_voices_reused"] + 1
    # silence after the reference, as at registration: another voice (its codes are longer)
    code, _, want = speak(server, voice="tail")
    code, _, got = speak(server, ref_audio=b64, ref_text=TRANSCRIPT, ref_tail_silence=0.5)
    assert code == 200 and got == want
    assert got != speak(server, voice="me")[2]


def test_a_bad_inline_voice_is_named(server, ref, tmp_path):
    b64 = base64.b64encode(ref).decode()
    buf = io.BytesIO()
    sf.write(buf, np.zeros(24000 * 61, np.float32), 24000, format="FLAC")   # 61 s, a few KB
    long = base64.b64encode(buf.getvalue()).decode()
    cases = [
        (dict(voice="me", ref_audio=b64, ref_text=TRANSCRIPT), 400, "voice", "not both"),
        (dict(ref_text=TRANSCRIPT), 400, "ref_text", "goes with `ref_audio`"),
        (dict(x_vector_only_mode=True), 400, "x_vector_only_mode", "goes with `ref_audio`"),
        (dict(ref_audio=b64), 400, "ref_text", "`ref_text` (the reference's transcript"),
        (dict(ref_audio=b64, x_vector_only_mode="yes"), 400, "x_vector_only_mode",
         "true or false"),
        (dict(ref_audio=b64, ref_text=7), 400, "ref_text", "must be a string"),
        (dict(ref_audio=["x"], ref_text=TRANSCRIPT), 400, "ref_audio", "must be a string"),
        (dict(ref_audio="/etc/hostname", ref_text=TRANSCRIPT), 400, "ref_audio", "base64"),
        (dict(ref_audio="http://127.0.0.1:1/ref.wav", ref_text=TRANSCRIPT), 400, "ref_audio",
         "paths and URLs are not read here"),
        (dict(ref_audio=base64.b64encode(b"not audio at all").decode(), ref_text=TRANSCRIPT),
         400, "ref_audio", "send WAV, FLAC, OGG or MP3"),
        (dict(ref_audio=long, x_vector_only_mode=True), 413, "ref_audio", "the limit is 60 s"),
        (dict(ref_audio=b64, ref_text="x" * 5000), 413, "ref_text", "characters"),
        (dict(ref_tail_silence=0.5), 400, "ref_tail_silence", "goes with `ref_audio`"),
        (dict(ref_audio=b64, ref_text=TRANSCRIPT, ref_tail_silence=6), 400, "ref_tail_silence",
         "seconds in [0, 5]"),
        (dict(ref_audio=b64, ref_text=TRANSCRIPT, ref_tail_silence="0.5"), 400,
         "ref_tail_silence", "seconds in [0, 5]"),
        (dict(ref_audio=b64, ref_text=TRANSCRIPT, ref_tail_silence=True), 400,
         "ref_tail_silence", "seconds in [0, 5]"),
    ]
    for fields, status, param, words in cases:
        code, _, data = speak(server, **fields)
        err = json.loads(data)["error"]
        assert (code, err["param"]) == (status, param), (fields.keys(), err)
        assert words in err["message"], (fields.keys(), err["message"])
    assert get(server.url + "/health")["status"] == "ok"


def test_encodes_at_once_are_bounded(server, ref):
    """Past `EncodeSlots.most` references being encoded, a new one is a 429 (Retry-After),
    given in a request or registered; a reference already encoded is still served."""
    slots = server.server_state.encoding
    b64 = base64.b64encode(ref).decode()
    assert speak(server, ref_audio=b64, ref_text=TRANSCRIPT)[0] == 200     # encoded, kept
    try:
        slots.most = 0
        code, headers, data = speak(server, ref_audio=b64, ref_text="Another transcript.")
        err = json.loads(data)["error"]
        assert code == 429 and headers["Retry-After"] == "1" and err["param"] == "ref_audio"
        assert "being encoded" in err["message"]
        code, out = multipart(server.url + "/v1/audio/voices", {"name": "later"},
                              {"audio_sample": ("ref.wav", ref)})
        assert code == 429 and out["error"]["param"] == "audio_sample", out
        assert "later" not in server.server_state.voices.voices
        assert speak(server, ref_audio=b64, ref_text=TRANSCRIPT)[0] == 200
    finally:
        slots.most = 4
    assert slots.busy == 0


def test_batch_items_give_their_own_voices(server, ref):
    b64 = base64.b64encode(ref).decode()
    code, _, want = speak(server, voice="me")
    item = {"input": "A short line to say.", "response_format": "pcm"}
    status, _, data = post(server.url + "/v1/audio/speech/batch", {
        "model": "tiny", **GREEDY, "items": [
            {**item, "ref_audio": b64, "ref_text": TRANSCRIPT},
            {**item, "ref_audio": "not base64!", "ref_text": TRANSCRIPT},
            {**item, "voice": "me"}]})
    assert status == 200, data
    got = json.loads(data)["data"]
    assert base64.b64decode(got[0]["audio"]) == want == base64.b64decode(got[2]["audio"])
    assert got[1]["error"]["param"] == "ref_audio" and got[1]["error"]["status"] == 400


def test_registered_voices_are_bounded(server, ref):
    """--max-voices: past it a registration is a 409 naming the limit, nothing is stored; a
    deletion makes room again."""
    state = server.server_state
    limit, have = state.options.max_voices, len(state.voices.voices)
    health = get(server.url + "/health")
    assert (health["voices"], health["max_voices"]) == (have, limit) == (3, 1000)
    try:
        state.options.max_voices = have
        code, out = multipart(server.url + "/v1/audio/voices", {"name": "one_more"},
                              {"audio_sample": ("ref.wav", ref)})
        assert code == 409 and out["error"]["code"] == "voice_limit_reached", out
        assert f"at most {have} registered" in out["error"]["message"]
        assert "one_more" not in state.voices.voices
        state.options.max_voices = have + 1
        code, out = multipart(server.url + "/v1/audio/voices", {"name": "one_more"},
                              {"audio_sample": ("ref.wav", ref)})
        assert code == 200, out
    finally:
        state.options.max_voices = limit
        state.voices.remove("one_more")


def test_a_text_session_takes_it_too(server, ref):
    """A WebSocket session whose first message gives the voice speaks as the registered one;
    a bad reference there is an error message naming the field."""
    pytest.importorskip("websockets")
    from test_server import ws_session

    b64 = base64.b64encode(ref).decode()
    pieces = [("text", "A short "), ("end", "line to say.")]
    want, done = ws_session(server, {"voice": "me", **GREEDY}, pieces)
    assert done["type"] == "done", done
    got, done = ws_session(server, {"ref_audio": b64, "ref_text": TRANSCRIPT, **GREEDY}, pieces)
    assert done["type"] == "done" and got == want
    _, err = ws_session(server, {"ref_audio": "nope", "ref_text": TRANSCRIPT}, [])
    assert err["type"] == "error" and err["status"] == 400 and err["param"] == "ref_audio", err


def test_other_checkpoints_refuse_it(make_checkpoint, ref):
    b64 = base64.b64encode(ref).decode()
    cv = Server(Qwen3TTS.from_pretrained(make_checkpoint("cv_proj")), ServerOptions())
    with pytest.raises(ApiError, match="needs a Base checkpoint") as e:
        asyncio.run(cv.inline_voice({"ref_audio": b64, "ref_text": TRANSCRIPT}))
    assert e.value.param == "ref_audio"


def test_a_cloned_voice_in_segments(server, base, ref):
    """A Base request in segments (`segment_chars`): every segment in the voice (ICL: the
    reference's codes before each), the API's `generate_voice_clone(..., segment_chars=)`."""
    text = "One sentence here. Another one there. And a third."
    voice = server.server_state.voices.voices["me"]
    (want,), _ = base.generate_voice_clone(text, voice_clone_prompt=voice, segment_chars=20,
                                           **GREEDY)
    for fields in ({"voice": "me"},
                   {"ref_audio": base64.b64encode(ref).decode(), "ref_text": TRANSCRIPT}):
        code, _, data = speak(server, input=text, segment_chars=20, **fields)
        assert code == 200, data
        got = np.frombuffer(data, "<i2").astype(np.float32) / 32767
        assert got.shape == want.shape
        np.testing.assert_allclose(got, np.clip(want, -1, 1), atol=3 / 32767)
