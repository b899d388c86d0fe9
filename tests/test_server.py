"""The HTTP server over real HTTP on localhost: the official `openai` client (plain and streaming),
raw requests for every error case, voice registration with a restart, the limits (429, 413, 504),
the `serve` command, and a bounded load test showing requests batched together.

One server per checkpoint per module (uvicorn in a thread), so JAX compiles each shape once; a
second app on the same model reuses the compiled programs. Every generation is short
(max_new_tokens 16: one frame bucket, one codec window bucket) and the CustomVoice servers pad to
one batch and prompt bucket, to keep the module fast.
"""
import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from qwen3_tts_jax import Qwen3TTS, prompts  # noqa: E402
from qwen3_tts_jax.server.app import ServerOptions, create_app  # noqa: E402

TOKENS = 16                       # frames = 15 per utterance
GEN = {"max_new_tokens": TOKENS}
# every batch padded to 8 rows and every prompt to >= 48 positions: one compiled program set
SHAPES = {"batch_buckets": (8,), "min_prompt_bucket": 48}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """uvicorn serving `app` on a free localhost port in a thread; `stop()` shuts it down."""

    def __init__(self, app):
        self.app = app
        self.server_state = app.state.server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 300          # a --warmup compiles before it starts (loaded CPU)
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)


def post(url, body, raw: bool = False, timeout=120):
    """(status, headers, bytes) of a POST with a JSON (or raw) body."""
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def multipart(url, fields: dict, files: dict, method="POST"):
    """(status, json) of a multipart/form-data request; files: name -> (filename, bytes)."""
    boundary = "----qwen3ttsjaxtest"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for k, (fname, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; '
                     f'filename="{fname}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method=method, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def delete(url):
    req = urllib.request.Request(url, method="DELETE")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def tiny_server(tts, **options) -> Running:
    """A server of `tts` named "tiny", one batch and prompt bucket (SHAPES), a cap of 64 new
    tokens and a 20 ms batch window, unless `options` say otherwise."""
    return Running(create_app(tts, ServerOptions(**{"model_name": "tiny", "max_new_tokens": 64,
                                                    "batch_window_ms": 20, **SHAPES,
                                                    **options})))


def serving(tts, **options):
    """A module fixture's body: `yield from serving(tts, ...)` (`tiny_server`, stopped after)."""
    s = tiny_server(tts, **options)
    yield s
    s.stop()


def parse_wav(data: bytes) -> np.ndarray:
    """A streamed WAV (sizes 0xFFFFFFFF): check the header by hand, samples as float."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and data[36:40] == b"data"
    fmt = struct.unpack("<IHHIIHH", data[16:36])
    assert fmt == (16, 1, 1, 24000, 48000, 2, 16)
    return np.frombuffer(data[44:], "<i2").astype(np.float32) / 32767


@pytest.fixture(scope="module")
def tts(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))


@pytest.fixture(scope="module")
def server(tts):
    yield from serving(tts, max_input_chars=200)


def speech(**kw):
    return {"model": "tiny", "input": "Hello world. This is a test.", "voice": "ryan", **kw}


def offline(tts, text, speaker, seed, **kw):
    codes = tts.generate_custom_voice_codes(text, speaker=speaker, seed=[seed], **kw)
    return tts.decode(codes)[0][0]


# ---------------------------------------------------------------------------------- openai client
def test_openai_client_wav_equals_offline(server, tts):
    """`client.audio.speech.create`: the WAV is the offline audio for the same seed (PRNGKey(s) per
    request, whatever else is batched), to 16-bit rounding."""
    client = server.client()
    out = client.audio.speech.create(model="tiny", voice="ryan", input="Hello world.",
                                     response_format="wav", extra_body={**GEN, "seed": 7})
    wave = parse_wav(out.content)
    ref = offline(tts, "Hello world.", "ryan", 7, **GEN)
    assert wave.shape == ref.shape == ((TOKENS - 1) * 1920,)
    np.testing.assert_allclose(wave, np.clip(ref, -1, 1), atol=2e-4 + 1e-4 * np.abs(ref).max())


def test_openai_streaming_pcm(server, tts):
    """`with_streaming_response.create` with pcm: chunks arrive (3 frames first, then 12) and
    concatenate to the offline audio."""
    client = server.client()
    parts = []
    with client.audio.speech.with_streaming_response.create(
            model="tiny", voice="vivian", input="Hello, world.",
            response_format="pcm", extra_body={**GEN, "seed": 3, "language": "english"}) as r:
        assert r.headers["content-type"] == "audio/pcm"
        for part in r.iter_bytes():
            parts.append(part)
    data = b"".join(parts)
    wave = np.frombuffer(data, "<i2").astype(np.float32) / 32767
    ref = offline(tts, "Hello, world.", "vivian", 3, language="english", **GEN)
    assert wave.shape == ref.shape
    np.testing.assert_allclose(wave, np.clip(ref, -1, 1), atol=2e-4 + 1e-4 * np.abs(ref).max())


def test_sse_stream(server):
    status, headers, body = post(server.url + "/v1/audio/speech",
                                 speech(response_format="pcm", stream_format="sse", seed=1, **GEN))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == TOKENS - 1
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(audio) == (TOKENS - 1) * 1920 * 2


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
def test_file_formats(server, tts, fmt):
    """Whole-file formats: decoded once at the end (the offline decode); flac is lossless, so it
    equals the offline audio to 16-bit rounding; the lossy ones have the right duration."""
    if fmt not in server.server_state.formats:
        pytest.skip(f"this libsndfile cannot write {fmt}")
    out = server.client().audio.speech.create(model="tiny", voice="ryan", input="Hello world.",
                                              response_format=fmt, extra_body={**GEN, "seed": 2})
    wave, sr = sf.read(io.BytesIO(out.content), dtype="float32")
    assert sr in (24000, 48000) and abs(len(wave) / sr - (TOKENS - 1) * 0.08) < 0.1
    if fmt == "flac":
        ref = offline(tts, "Hello world.", "ryan", 2, **GEN)
        assert wave.shape == ref.shape
        np.testing.assert_allclose(wave, np.clip(ref, -1, 1), atol=1e-4 + 1e-5 * np.abs(ref).max())


def test_voices_models_health(server):
    voices = get(server.url + "/v1/audio/voices")
    assert sorted(v["id"] for v in voices["data"]) == sorted(
        ["serena", "vivian", "uncle_fu", "ryan", "aiden", "ono_anna", "sohee", "eric", "dylan"])
    assert all(v["type"] == "preset" for v in voices["data"])
    assert get(server.url + "/v1/models")["data"][0]["id"] == "tiny"
    h = get(server.url + "/health")
    assert h["status"] == "ok" and h["tts_model_type"] == "custom_voice" and "wav" in h["formats"]
    assert h["decode_kernels"] == {"predictor": "xla", "talker": "xla"}   # this backend's default


def scrape(url, headers=None) -> dict:
    """GET /metrics parsed: {sample name with its labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(url + "/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def metric(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items()
               if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_metrics(server):
    """GET /metrics (Prometheus' text format) moves by what two requests did: the engine's
    counters, the batches by size, the audio sent, and per request its queue wait, duration and
    (streamed only) its time to first audio, each within the client's own wall time."""
    before = scrape(server.url)
    t = time.monotonic()
    code, _, pcm = post(server.url + "/v1/audio/speech", speech(response_format="pcm", seed=1,
                                                                **GEN))
    wall_pcm = time.monotonic() - t
    code2, _, flac = post(server.url + "/v1/audio/speech", speech(response_format="flac",
                                                                  seed=2, **GEN))
    assert code == 200 and code2 == 200
    after = scrape(server.url)
    d = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)
    assert d("qwen3_tts_requests_total") == 2 and d("qwen3_tts_finished_total") == 2
    assert d("qwen3_tts_errors_total") == 0 and d("qwen3_tts_frames_total") == 2 * (TOKENS - 1)
    assert d("qwen3_tts_cohorts_total") == 2 == d("qwen3_tts_batches_total")
    assert d("qwen3_tts_batches_total", size="1") == 2
    samples = len(pcm) // 2 + len(sf.read(io.BytesIO(flac))[0])
    assert abs(d("qwen3_tts_audio_seconds_total") - samples / 24000) < 1e-6
    for name in ("qwen3_tts_queue_wait_seconds", "qwen3_tts_request_duration_seconds"):
        assert d(name + "_count", route="speech") == 2
        assert d(name + "_bucket", route="speech", le="+Inf") == 2
    assert d("qwen3_tts_time_to_first_audio_seconds_count", route="speech") == 1
    first = d("qwen3_tts_time_to_first_audio_seconds_sum", route="speech")
    assert 0 < first < wall_pcm
    assert metric(after, "qwen3_tts_up") == 1 and metric(after, "qwen3_tts_queue") == 0
    assert metric(after, "qwen3_tts_active") == 0


def test_metrics_without_prometheus_client(tts, monkeypatch):
    """Without the prometheus-client package (outside the serve extra) the server still serves;
    /metrics answers 501 naming the package."""
    from qwen3_tts_jax.server import metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "prometheus_client", None)
    s = tiny_server(tts)
    try:
        code, _, data = post(s.url + "/v1/audio/speech", speech(response_format="pcm", seed=1,
                                                                **GEN))
        assert code == 200 and len(data) == (TOKENS - 1) * 1920 * 2
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(s.url)
        assert e.value.code == 501 and "prometheus-client" in json.loads(e.value.read())[
            "error"]["message"]
    finally:
        s.stop()


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body,status,needle", [
    (speech(voice="bob"), 400, "unknown voice 'bob'"),
    (speech(voice="alloy"), 400, "not mapped"),
    (speech(voice={"id": "nobody"}), 400, "valid voices"),
    (speech(input="   "), 400, "empty"),
    (speech(input=None), 400, "`input` is required"),
    (speech(input="x" * 201), 413, "at most 200"),
    (speech(response_format="aac"), 400, "supported: ['wav', 'pcm'"),
    (speech(response_format="ogg"), 400, "not supported"),
    (speech(speed=1.5), 400, "speed 1.5 is not supported"),
    (speech(speed="fast"), 400, "`speed` must be a number"),
    (speech(colour="red"), 400, "unknown field(s) ['colour']"),
    (speech(model=None), 400, "`model` is required"),
    (speech(max_new_tokens=65), 400, "above this server's cap of 64"),
    (speech(temperature=0), 400, "temperature must be > 0"),
    (speech(top_p=2.0), 400, "top_p"),
    (speech(seed="x"), 400, "seed"),
    (speech(temperature="0.5"), 400, "temperature must be a number, got str"),
    (speech(do_sample="no"), 400, "do_sample must be True or False"),
    (speech(language="klingon"), 400, "unsupported language"),
    (speech(stream_format="sse", response_format="mp3"), 400, "sse"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests(server, body, status, needle):
    code, _, data = post(server.url + "/v1/audio/speech", body)
    err = json.loads(data)["error"]
    assert code == status and needle in err["message"], (code, err)
    assert err["type"] == ("request_too_large" if status == 413 else "invalid_request_error")


@pytest.mark.parametrize("field,value", [("temperature", "0.5"), ("top_k", "5"),
                                         ("do_sample", "no"), ("max_new_tokens", 1)])
def test_bad_setting_names_its_param(server, field, value):
    code, _, data = post(server.url + "/v1/audio/speech", speech(**{field: value}))
    assert code == 400 and json.loads(data)["error"]["param"] == field, data


def test_text_session_binary_frames_are_an_error(server):
    pytest.importorskip("websockets")
    from websockets.sync.client import connect

    for first in ([b"\x00\x01"], [json.dumps({"voice": "ryan", **GEN}), b"\x00\x01"]):
        with connect(server.url.replace("http", "ws") + "/v1/audio/speech/stream") as ws:
            for m in first:
                ws.send(m)
            while isinstance(msg := ws.recv(timeout=300), bytes):
                pass
            msg = json.loads(msg)
            assert msg["type"] == "error" and msg["status"] == 400, msg
            assert "binary frames are not accepted" in msg["message"], msg


def test_malformed_json(server):
    code, _, data = post(server.url + "/v1/audio/speech", b'{"model": "tiny", "input": ', raw=True)
    assert code == 400 and "not valid JSON" in json.loads(data)["error"]["message"]


def test_openai_client_sees_the_error(server):
    with pytest.raises(openai.BadRequestError, match="unknown voice"):
        server.client().audio.speech.create(model="tiny", voice="alloy", input="Hi.")


def test_register_voice_needs_a_base_model(server):
    code, out = multipart(server.url + "/v1/audio/voices", {"name": "me"},
                          {"audio_sample": ("a.wav", b"RIFF")})
    assert code == 400 and "Base checkpoint" in out["error"]["message"]


# ---------------------------------------------------------------------------------- limits
def test_queue_full_is_429_and_deadline_is_504(tts, server):
    """The worker is held by a blocking call, so the queue fills deterministically; a zero request
    timeout expires before the worker admits the request."""
    small = Running(create_app(tts, ServerOptions(max_queue=1, max_batch_size=1,
                                                  max_new_tokens=TOKENS, **SHAPES)))
    try:
        release = threading.Event()
        small.server_state.engine.call(lambda: release.wait(60))
        body = speech(response_format="wav", seed=0)
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, small.url + "/v1/audio/speech", body)
            while small.server_state.engine.waiting < 1:
                time.sleep(0.01)
            code, headers, data = post(small.url + "/v1/audio/speech", body)
            assert code == 429 and headers["Retry-After"] == "1"
            assert "limit is 1" in json.loads(data)["error"]["message"]
            release.set()
            assert first.result()[0] == 200
    finally:
        small.stop()
    late = Running(create_app(tts, ServerOptions(request_timeout=0.0)))
    try:
        code, _, data = post(late.url + "/v1/audio/speech", speech(response_format="flac"))
        assert code == 504 and "ran out of time" in json.loads(data)["error"]["message"]
    finally:
        late.stop()


def test_token_limit_is_413(tts):
    """A prompt longer than the model's positions (here a tiny limit) is refused up front."""
    from qwen3_tts_jax.server.app import ApiError, Server

    srv = Server(tts, ServerOptions(max_new_tokens=TOKENS, max_input_chars=10 ** 6))
    limit = tts.config.talker.max_position_embeddings
    with pytest.raises(ApiError) as e:
        srv.parse_speech(speech(input="word " * (limit // 2), max_new_tokens=TOKENS))
    assert e.value.status == 413 and "positions" in e.value.message


# ---------------------------------------------------------------------------------- load
def test_concurrent_clients_are_batched(server):
    """1, 4 and 8 concurrent clients, 2 requests each (bounded: 26 requests, 120 s timeout each):
    no request fails, and with several clients requests ran in batches of more than one."""
    engine = server.server_state.engine
    assert post(server.url + "/v1/audio/speech", speech(**GEN))[0] == 200   # compiled, warm
    results = {}
    for clients in (1, 4, 8):
        before = dict(engine.stats["batch_sizes"])

        def one(i):
            t0 = time.perf_counter()
            code, _, data = post(server.url + "/v1/audio/speech",
                                 speech(input=f"Client request number {i}.", response_format="pcm",
                                        seed=i, **GEN), timeout=120)
            return code, len(data), time.perf_counter() - t0

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(one, range(2 * clients)))
        wall = time.perf_counter() - t0
        assert all(code == 200 and n == (TOKENS - 1) * 1920 * 2 for code, n, _ in out), out
        sizes = {k: v - before.get(k, 0) for k, v in engine.stats["batch_sizes"].items()
                 if v - before.get(k, 0)}
        results[clients] = (len(out) * (TOKENS - 1) * 0.08 / wall, sizes)
    print({c: f"{r[0]:.1f} audio s/s, batch sizes {r[1]}" for c, r in results.items()})
    assert max(results[1][1]) == 1
    assert max(results[4][1]) > 1 and max(results[8][1]) > 1


# ---------------------------------------------------------------------------------- voice clone
def test_register_voice_and_reload(make_checkpoint, tmp_path):
    """Base model: register a cloned voice over HTTP (multipart upload + transcript, and with the
    openai client's `audio.voices.create`), speak with it, find it again after a restart."""
    from test_audio import write_speech

    base = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    voices_dir = tmp_path / "voices"
    ref = write_speech(tmp_path / "ref.wav", 22050)
    with open(ref, "rb") as f:
        ref_bytes = f.read()
    opts = ServerOptions(voices_dir=str(voices_dir), max_new_tokens=TOKENS,
                         min_prompt_bucket=64)   # x-vector and ICL prompts: one bucket
    s = Running(create_app(base, opts))
    try:
        assert get(s.url + "/v1/audio/voices")["data"] == []
        code, _, data = post(s.url + "/v1/audio/speech", speech(voice="me"))
        assert code == 400 and "register one first" in json.loads(data)["error"]["message"]
        code, out = multipart(s.url + "/v1/audio/voices",
                              {"name": "me", "transcript": "Hello world."},
                              {"audio_sample": ("ref.wav", ref_bytes)})
        assert code == 200 and out["id"] == "me" and out["mode"] == "icl", out
        client = s.client()
        if hasattr(client.audio, "voices"):      # openai releases with custom voices
            v = client.audio.voices.create(name="xvec", audio_sample=("ref.wav", ref_bytes),
                                           consent="n/a")
            assert v.id == "xvec"
        else:
            code, out = multipart(s.url + "/v1/audio/voices", {"name": "xvec"},
                                  {"audio_sample": ("ref.wav", ref_bytes)})
            assert code == 200, out
        code, out = multipart(s.url + "/v1/audio/voices", {"name": "me"},
                              {"audio_sample": ("ref.wav", b"not audio")})
        assert code == 409 and "exists" in out["error"]["message"]
        code, out = multipart(s.url + "/v1/audio/voices", {"name": "bad"},
                              {"audio_sample": ("junk.wav", b"not audio")})
        msg = out["error"]["message"]
        assert code == 400 and "cannot read the uploaded audio" in msg and "'junk.wav'" in msg
        assert "BytesIO" not in msg and out["error"]["param"] == "audio_sample", out
        code, out = multipart(s.url + "/v1/audio/voices", {"name": "../evil"},
                              {"audio_sample": ("ref.wav", ref_bytes)})
        assert code == 400 and "`name` '../evil' is not a valid voice name" in \
            out["error"]["message"]
        for bad in ("x", "9"):
            code, out = multipart(s.url + "/v1/audio/voices",
                                  {"name": "pad", "transcript": "Hello world.",
                                   "ref_tail_silence": bad}, {"audio_sample": ("ref.wav", ref_bytes)})
            assert code == 400 and out["error"]["param"] == "ref_tail_silence", out
        code, out = multipart(s.url + "/v1/audio/voices",
                              {"name": "pad", "transcript": "Hello world.",
                               "ref_tail_silence": "0.5"}, {"audio_sample": ("ref.wav", ref_bytes)})
        assert code == 200, out
        assert len(s.server_state.voices.voices["pad"][0].ref_code) > \
            len(s.server_state.voices.voices["me"][0].ref_code) + 5
        assert delete(s.url + "/v1/audio/voices/pad")[0] == 200
        for voice in ("me", "xvec"):
            out = s.client().audio.speech.create(model="m", voice=voice, input="Hi.",
                                                 response_format="wav",
                                                 extra_body={**GEN, "seed": 1})
            assert len(parse_wav(out.content)) % 1920 == 0 and len(out.content) > 44
        code, _, data = post(s.url + "/v1/audio/speech", speech(voice="me", instructions="x"))
        assert code == 400 and "instructions" in json.loads(data)["error"]["message"]
    finally:
        s.stop()
    assert sorted(os.listdir(voices_dir)) == ["me.voice", "xvec.voice"]
    s = Running(create_app(base, opts))
    try:
        listed = {v["id"]: v for v in get(s.url + "/v1/audio/voices")["data"]}
        assert listed["me"]["transcript"] == "Hello world." and listed["xvec"]["mode"] == \
            "x_vector_only"
        code, out = delete(s.url + "/v1/audio/voices/me")
        assert code == 200 and out["deleted"]
        assert delete(s.url + "/v1/audio/voices/me")[0] == 404
    finally:
        s.stop()
    assert os.listdir(voices_dir) == ["xvec.voice"]


def test_voice_design_takes_instructions(make_checkpoint):
    """VoiceDesign: the voice is described in `instructions` (required); `voice` is not used."""
    from qwen3_tts_jax.server.app import ApiError, Server

    vd = Qwen3TTS.from_pretrained(make_checkpoint("vd_bigvocab"))
    srv = Server(vd, ServerOptions())
    with pytest.raises(ApiError, match="describe the voice"):
        srv.parse_speech(speech(voice="alloy"))
    req = srv.parse_speech(speech(voice="alloy", instructions="A calm, low voice."))
    want = vd.voice_design_prompts("Hello world. This is a test.", "A calm, low voice.",
                                    "auto", True)[0]
    assert np.array_equal(req.job.prompt.text_L, want.text_L)
    assert srv.voice_names() == []


# ---------------------------------------------------------------------------------- command
def test_serve_command(tmp_path):
    """`qwen3-tts-jax serve --random-weights` starts, answers /health and a request, and stops on
    SIGINT (generation itself is tested in-process above)."""
    from test_cli import EXE

    r = subprocess.run([EXE, "serve", "--random-weights", "--model-parallel", "2"],
                       capture_output=True, text=True, timeout=300)
    assert (r.returncode == 2 and "whole copy of the model" in r.stderr
            and "Traceback" not in r.stderr)
    r = subprocess.run([EXE, "serve", "--random-weights", "--devices", "3"],
                       capture_output=True, text=True, timeout=300)
    assert (r.returncode == 2 and "devices=3" in r.stderr and "local device" in r.stderr
            and "Traceback" not in r.stderr), r.stderr[-2000:]
    r = subprocess.run([EXE, "serve", "--random-weights", "--warmup", "16,x"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--warmup takes" in r.stderr and "'16,x'" in r.stderr
    r = subprocess.run([EXE, "serve", "--random-weights", "--warmup-whole-file"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--warmup-whole-file needs --warmup" in r.stderr, r.stderr[-2000:]
    for flag in ("--max-batch-items", "--max-voices"):
        r = subprocess.run([EXE, "serve", "--random-weights", flag, "0"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and f"{flag} must be > 0, got 0" in r.stderr, r.stderr
    # where uvicorn could not listen: refused before the model is built or loaded
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for args, needle in ((["--port", "70000"], "--port must be in 0..65535, got 70000"),
                             (["--port", str(busy)], f"cannot listen on 127.0.0.1:{busy}: "),
                             (["--host", "no-such-host.invalid"], "cannot listen on no-such")):
            r = subprocess.run([EXE, "serve", "--random-weights", *args],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]
            assert "NOISE" not in r.stderr and "Traceback" not in r.stderr
    port = free_port()
    p = subprocess.Popen([EXE, "serve", "--random-weights", "--port", str(port), "--quiet",
                          "--voices-dir", str(tmp_path / "v"), "--max-new-tokens", "8"],
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert p.poll() is None and time.time() < deadline, p.communicate()[0]
            try:
                if get(url + "/health")["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.2)
        code, _, data = post(url + "/v1/audio/speech", {"model": "m", "input": "Hi.",
                                                        "voice": "alloy"})
        assert code == 400 and "valid voices" in json.loads(data)["error"]["message"]
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------------- text sessions
def ws_session(server, first: dict, pieces: list, pause: float = 0.05):
    """Run a WebSocket text session: (pcm bytes, final JSON message)."""
    from websockets.sync.client import connect

    audio = b""
    with connect(server.url.replace("http", "ws") + "/v1/audio/speech/stream") as ws:
        ws.send(json.dumps(first))
        for kind, text in pieces:
            ws.send(json.dumps({"type": kind, "text": text}))
            time.sleep(pause)
        while True:
            msg = ws.recv(timeout=300)
            if isinstance(msg, bytes):
                audio += msg
            else:
                return audio, json.loads(msg)


def test_text_session_equals_offline_streaming_mode(server, tts):
    """Text fed in pieces over the WebSocket (split mid-word, with pauses) gives the codes of the
    offline streaming-text-mode generation of the whole text: the frame loop never runs past the
    text received, so the timing of the pieces does not matter."""
    pytest.importorskip("websockets")
    text = "Hello world, this is a test."
    pieces = [("text", "Hel"), ("text", "lo wor"), ("text", "ld, this "), ("text", "is a"),
              ("end", " test.")]
    before = scrape(server.url)
    audio, done = ws_session(server, {"voice": "ryan", "seed": 4, **GEN}, pieces)
    assert done["type"] == "done" and done["frames"] == TOKENS - 1, done
    after = scrape(server.url)      # the session's latencies, under its own route
    for name in ("time_to_first_audio", "queue_wait", "request_duration"):
        n = f"qwen3_tts_{name}_seconds_count"
        assert metric(after, n, route="session") - metric(before, n, route="session") == 1
        assert metric(after, n, route="speech") == metric(before, n, route="speech")
    assert metric(after, "qwen3_tts_sessions_total") - metric(before, "qwen3_tts_sessions_total") == 1
    wave = np.frombuffer(audio, "<i2").astype(np.float32) / 32767
    ref = offline(tts, text, "ryan", 4, non_streaming_mode=False, **GEN)
    assert wave.shape == ref.shape
    np.testing.assert_allclose(wave, np.clip(ref, -1, 1), atol=2e-4 + 1e-4 * np.abs(ref).max())
    assert done["input_tokens"] == len(prompts.input_ids(tts.tokenizer, text)) - 8


@pytest.mark.parametrize("first,pieces,needle", [
    ({"voice": "bob"}, [], "unknown voice"),
    ({"voice": "ryan", "response_format": "mp3"}, [], "pcm"),
    ({"voice": "ryan"}, [("shout", "x")], "unknown message"),
    ({"voice": "ryan", **GEN}, [("end", "")], "without any text"),
    ({"voice": "ryan", **GEN}, [("text", "x" * 201)], "at most 200"),
    ({"voice": "ryan", "segment_chars": -1}, [], "segment_chars must be an integer >= 0"),
    ({"voice": "ryan", "stream_format": "sse"}, [], "stream_format does not apply"),
])
def test_text_session_errors(server, first, pieces, needle):
    pytest.importorskip("websockets")
    audio, msg = ws_session(server, first, pieces, pause=0)
    assert msg["type"] == "error" and needle in msg["message"], msg


def test_engine_failure_is_a_500_and_the_server_goes_on(server, monkeypatch):
    """A failure inside generation reaches the client as an OpenAI-shaped 500; the next request
    is served normally."""
    from qwen3_tts_jax import engine as engine_mod

    def boom(*a, **k):
        raise RuntimeError("planted failure")

    before = scrape(server.url)
    monkeypatch.setattr(engine_mod.Cohort, "step", boom)
    code, _, data = post(server.url + "/v1/audio/speech", speech(response_format="wav", **GEN))
    assert code == 500 and "planted failure" in json.loads(data)["error"]["message"]
    monkeypatch.undo()
    after = scrape(server.url)     # counted as an error; no duration, no first audio
    d = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)
    assert d("qwen3_tts_requests_total") == 1 and d("qwen3_tts_errors_total") >= 1
    assert d("qwen3_tts_finished_total") == 0 == d("qwen3_tts_audio_seconds_total")
    assert d("qwen3_tts_request_duration_seconds_count", route="speech") == 0
    assert d("qwen3_tts_time_to_first_audio_seconds_count", route="speech") == 0
    assert metric(after, "qwen3_tts_up") == 1 and metric(after, "qwen3_tts_active") == 0
    # seed 1 runs the full 15 frames (test_sse_stream); unseeded, a tiny random model may sample EOS
    code, _, data = post(server.url + "/v1/audio/speech",
                         speech(response_format="pcm", seed=1, **GEN))
    assert code == 200 and len(data) == (TOKENS - 1) * 1920 * 2


def test_warmup_compiles_before_the_first_request(tts, caplog):
    """`--warmup`: the first request of the warmed shapes compiles nothing (no JAX tracing on
    its path); the control, the same request on a server of other shapes without warm-up,
    does. Shapes no other test uses (batch bucket 2, prompt buckets 64 and 96)."""
    import jax

    traced = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traced.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for warm, bucket in ((True, 64), (False, 96)):
            options = ServerOptions(model_name="tiny", batch_buckets=(2,), max_batch_size=2,
                                    min_prompt_bucket=bucket, max_new_tokens=TOKENS,
                                    warmup=(1,) if warm else ())
            with caplog.at_level("INFO", logger="qwen3_tts_jax.server"):
                run = Running(create_app(tts, options))
            try:
                traced.clear()
                status, _, body = post(run.url + "/v1/audio/speech",
                                       speech(response_format="pcm", seed=1))
                assert status == 200 and len(body) == 2 * 1920 * (TOKENS - 1), len(body)
                compiled = len(traced)
            finally:
                run.stop()
            if warm:
                assert compiled == 0, f"{compiled} programs traced after the warm-up"
                assert any("warm-up: batch buckets [2]" in r.message for r in caplog.records)
            else:
                assert compiled > 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_clone_text_session_equals_offline_streaming_mode(make_checkpoint, tmp_path):
    """Base model text sessions with registered voices: x-vector, and ICL, where the prompt takes
    as many text tokens as the reference has frames beyond its transcript (a long text sent in
    pieces, and a short final text that ends inside the prompt). Each gives the audio of the
    offline streaming-text-mode clone of the whole text, same seed."""
    pytest.importorskip("websockets")
    from qwen3_tts_jax import save_voice

    base = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    t = np.arange(int(0.8 * 24000)) / 24000
    wave = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(
        np.float32)
    voices = {"icl": base.create_voice_clone_prompt((wave, 24000), ref_text="Hi."),
              "xvec": base.create_voice_clone_prompt((wave, 24000), x_vector_only_mode=True)}
    (tmp_path / "v").mkdir()
    for name, items in voices.items():
        save_voice(items, str(tmp_path / "v" / f"{name}.voice"))
    room = 1 + len(voices["icl"][0].ref_code)
    long_text = "Hello world, this is a longer test of a cloned voice in a text session."
    assert len(prompts.input_ids(base.tokenizer, long_text)) - 8 > room       # past the ICL prompt's share
    opts = ServerOptions(voices_dir=str(tmp_path / "v"), max_new_tokens=TOKENS,
                         min_prompt_bucket=64)
    # The layout itself (a tiny random model's audio barely depends on one text position): the
    # session's prompt and trailing text equal the offline prompt's, whatever part of the text
    # has arrived; the prompt never changes once its share of the text is there.
    from qwen3_tts_jax.server.app import Server
    from qwen3_tts_jax.server.sessions import parse_session

    srv = Server(base, opts)
    for voice in voices:
        for text in (long_text, "Hi there.", "A"):
            feed = parse_session(srv, {"voice": voice, **GEN}).feed
            tokens = prompts.input_ids(base.tokenizer, text)[3:-5]
            (want,), _ = base.voice_clone_prompts(text, None, None, None, False, voices[voice],
                                                   False)
            got = feed.build(tokens, True)
            assert np.array_equal(got.text_L, want.text_L), (voice, text)
            assert np.array_equal(got.codec_LxG, want.codec_LxG) and got.extra_pos == \
                want.extra_pos
            assert list(feed.trailing(tokens, True)) == list(want.trailing), (voice, text)
            for n in range(len(tokens)):              # text still arriving
                part = tokens[:n]
                if feed.can_start(part, False):
                    assert np.array_equal(feed.build(part, False).text_L, want.text_L)
                    assert list(want.trailing[:len(feed.trailing(part, False))]) == list(
                        feed.trailing(part, False))
    s = Running(create_app(base, opts))
    try:
        for voice, text, pieces in [
                ("xvec", long_text, [("text", "Hello wor"), ("end", long_text[9:])]),
                ("icl", long_text, [("text", long_text[:20]), ("text", long_text[20:41]),
                                    ("end", long_text[41:])]),
                ("icl", "Hi there.", [("end", "Hi there.")])]:
            audio, done = ws_session(s, {"voice": voice, "seed": 5, **GEN}, pieces)
            assert done["type"] == "done", (voice, done)
            got = np.frombuffer(audio, "<i2").astype(np.float32) / 32767
            wavs, _ = base.generate_voice_clone(text, voice_clone_prompt=voices[voice],
                                                non_streaming_mode=False, seed=[5], **GEN)
            ref = wavs[0]
            assert got.shape == ref.shape, (voice, text, got.shape, ref.shape)
            np.testing.assert_allclose(got, np.clip(ref, -1, 1),
                                       atol=2e-4 + 1e-4 * np.abs(ref).max())
    finally:
        s.stop()


POOL = """
import concurrent.futures as cf, json, sys
sys.path.insert(0, sys.argv[2])
import jax
jax.config.update("jax_default_matmul_precision", "float32")
import numpy as np
from qwen3_tts_jax import Qwen3TTS
from qwen3_tts_jax.server.app import ServerOptions, create_app
from test_server import GEN, Running, get, offline, parse_wav, post, speech

tts = Qwen3TTS.from_pretrained(sys.argv[1])
out = {}
try:
    create_app(tts, ServerOptions(devices=9))
except ValueError as e:
    out["too_many"] = str(e)
s = Running(create_app(tts, ServerOptions(model_name="tiny", devices=4, max_new_tokens=64,
                                          batch_window_ms=20, max_batch_size=2, batch_buckets=(2,),
                                          min_prompt_bucket=48)))

def one(i):
    code, _, data = post(s.url + "/v1/audio/speech", speech(input=f"Client request number {i}.",
                                                             response_format="wav", seed=i, **GEN),
                         timeout=300)
    assert code == 200, (code, data[:300])
    ref = np.clip(offline(tts, f"Client request number {i}.", "ryan", i, **GEN), -1, 1)
    wave = parse_wav(data)
    assert wave.shape == ref.shape, (wave.shape, ref.shape)
    return float(np.abs(wave - ref).max() / (2e-4 + 1e-4 * np.abs(ref).max()))

with cf.ThreadPoolExecutor(8) as ex:
    out["worst"] = max(ex.map(one, range(8)))
health = get(s.url + "/health")
out["devices"] = [d["requests"] for d in health["devices"]]
out["requests"] = health["stats"]["requests"]
s.stop()
print(json.dumps(out))
"""


def test_server_on_several_devices(make_checkpoint, tmp_path):
    """`--devices 4` on 8 simulated CPU devices: an engine per device (`EnginePool`), concurrent
    requests spread over the devices (/health counts them per device), each response the
    one-device offline audio of its seed; more devices than the host has is a clear error."""
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, str(script), make_checkpoint("cv_proj"),
                        os.path.dirname(__file__)], capture_output=True, text=True, timeout=900,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "devices=9" in got["too_many"] and "8 local device" in got["too_many"], got
    assert got["worst"] <= 1.0, got          # within 2e-4 + 1e-4 * peak of the offline audio
    assert len(got["devices"]) == 4 and sum(got["devices"]) == got["requests"] == 8, got
    assert sum(n > 0 for n in got["devices"]) >= 2, got


def test_api_key(tts):
    """With an API key, /v1/... needs `Authorization: Bearer <key>` (401 in OpenAI's shape, which
    the official client raises as AuthenticationError), a WebSocket may pass `?api_key=`, and
    /health stays open."""
    s = tiny_server(tts, api_key="s3cret")
    try:
        code, headers, data = post(s.url + "/v1/audio/speech", speech(**GEN))
        err = json.loads(data)["error"]
        assert code == 401 and err["code"] == "invalid_api_key" and "Bearer" in err["message"]
        assert headers["WWW-Authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()                  # api_key="x"
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny"]
        out = good.audio.speech.create(model="tiny", voice="ryan", input="Hello world.",
                                       response_format="wav", extra_body={**GEN, "seed": 7})
        assert parse_wav(out.content).shape == ((TOKENS - 1) * 1920,)
        assert get(s.url + "/health")["status"] == "ok"
        with pytest.raises(urllib.error.HTTPError) as e:      # /metrics needs the key too
            scrape(s.url)
        assert e.value.code == 401
        m = scrape(s.url, {"Authorization": "Bearer s3cret"})
        assert metric(m, "qwen3_tts_requests_total") == 1
        pytest.importorskip("websockets")
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        url = s.url.replace("http", "ws") + "/v1/audio/speech/stream"
        with pytest.raises(InvalidStatus):
            with connect(url):
                pass
        with connect(url + "?api_key=s3cret") as ws:           # through: the session's own error
            ws.send(json.dumps({"voice": "bob"}))
            assert "unknown voice" in json.loads(ws.recv(timeout=60))["message"]
    finally:
        s.stop()


def test_sampler_kinds_reuse_compiled_programs(tts):
    """With the sampler specialized (the accelerators' default), a cohort runs the narrowest
    kind this server has already used that serves its rows: a greedy request after sampled ones
    runs their program (no new trace) and still gives its offline audio; a top-p request needs
    the general kind and compiles it; the kinds themselves are in `sampling.KINDS` order."""
    import jax

    from official import with_options
    from qwen3_tts_jax import sampling
    from qwen3_tts_jax.engine import BatchEngine

    tts = with_options(tts, specialize_sampler=True)
    e = BatchEngine(tts, max_batch_size=2)
    assert [e._sampler_kind("talker", k) for k in ("top_k", "greedy", "full", "top_k",
                                                   "greedy")] == ["top_k", "top_k", "full",
                                                                  "top_k", "top_k"]
    assert e._sampler_kind("predictor", "greedy") == "greedy"   # per role
    with pytest.raises(ValueError, match="cannot serve"):
        sampling.SamplingParams.create(2, do_sample=[True, False], kind="greedy")

    traced = []
    listener = lambda event, duration, **_: traced.append(event) \
        if event == "/jax/core/compile/jaxpr_trace_duration" else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    run = Running(create_app(tts, ServerOptions(model_name="tiny", max_new_tokens=TOKENS,
                                                batch_buckets=(2,), max_batch_size=2,
                                                min_prompt_bucket=32)))
    try:
        greedy = dict(do_sample=False, subtalker_dosample=False)
        for kw, compiles in ((dict(seed=3), True), (dict(seed=4, **greedy), False),
                             (dict(seed=5, top_p=0.7), True)):
            traced.clear()
            status, _, body = post(run.url + "/v1/audio/speech",
                                   speech(response_format="pcm", **kw))
            assert status == 200, body
            assert bool(traced) == compiles, (kw, len(traced))
            got = np.frombuffer(body, "<i2").astype(np.float32) / 32767
            want = offline(tts, speech()["input"], "ryan", kw.pop("seed"), max_new_tokens=TOKENS,
                           **kw)
            np.testing.assert_allclose(got, want, atol=2e-4)
        assert run.server_state.engine._kinds["talker"] == {"top_k", "full"}
    finally:
        run.stop()
        jax.monitoring.unregister_event_duration_listener(listener)


def test_warmup_whole_file_compiles_the_codec_windows(tts, caplog):
    """`--warmup --warmup-whole-file`: a flac request's decode (300-frame chunks with 25 frames
    of context, windows padded to the ladder) traces nothing after the warm-up; the control,
    plain `--warmup` from cold caches, traces the codec. The windows listed are the ladder's up to
    the longest utterance, per batch bucket, and never past a full chunk's 325 frames."""
    import jax

    from qwen3_tts_jax.engine import BatchEngine

    e = BatchEngine(None, max_batch_size=2, batch_buckets=(1, 2))
    assert e.whole_file_windows(40) == [(B, T) for B in (1, 2) for T in (16, 24, 32, 48)]
    assert max(T for _, T in e.whole_file_windows(5000)) == 325

    traced = []
    listener = lambda event, duration, **kw: traced.append(kw) \
        if event == "/jax/core/compile/jaxpr_trace_duration" else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for whole in (False, True):
            jax.clear_caches()   # cold: earlier tests compiled codec windows of their own
            options = ServerOptions(model_name="tiny", batch_buckets=(2,), max_batch_size=2,
                                    max_new_tokens=40, warmup=(1,), warmup_whole_file=whole)
            with caplog.at_level("INFO", logger="qwen3_tts_jax.server"):
                run = Running(create_app(tts, options))
            try:
                if "flac" not in run.server_state.formats:
                    pytest.skip("this libsndfile cannot write flac")
                traced.clear()
                status, _, body = post(run.url + "/v1/audio/speech",
                                       speech(input="a", response_format="flac", seed=7,
                                              max_new_tokens=40))   # the warmed prompt bucket
                assert status == 200, body
                wave, _ = sf.read(io.BytesIO(body), dtype="float32")
                assert len(wave) == 39 * 1920
                assert bool(traced) != whole, (whole, traced)
            finally:
                run.stop()
        assert any("whole-file decodes up to 40 frames" in r.message for r in caplog.records)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
