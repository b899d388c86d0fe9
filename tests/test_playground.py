"""The playground page that `qwen3-tts-jax serve` shows at /, driven in headless Chromium
(Debian's `chromium` and `chromium-driver`, installed by `scripts/setup.sh --test`, through
selenium): API key, voices, streamed playback, the server's errors in the page, Stop, the
WebSocket text session, and registering a voice on a Base checkpoint from an uploaded file.

Each server is `serve --random-weights TYPE` in a subprocess with a batch and prompt bucket fixed,
so one set of programs compiles per server. The page's state object (`window.playground`) counts
the samples received, scheduled on the WebAudio clock and played.
"""
import base64
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi", reason="serve needs the [serve] extra")
pytest.importorskip("uvicorn", reason="serve needs the [serve] extra")
pytest.importorskip("selenium", reason="the browser test needs selenium (the [test] extra)")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium is not installed (scripts/setup.sh --test installs Debian's "
                "chromium and chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

EXE = os.path.join(os.path.dirname(sys.executable), "qwen3-tts-jax")
KEY = "playground-test-key"
TOKENS = 256                       # the servers' cap: 20 s of audio, long enough to press Stop
WAIT = 600                         # seconds; a first request compiles (tens of seconds on CPU)
# README's screenshot: QWEN3_TTS_JAX_SCREENSHOT=docs/playground.png pytest tests/test_playground.py
SCREENSHOT = os.environ.get("QWEN3_TTS_JAX_SCREENSHOT")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return json.loads(r.read())


class Serve:
    """`qwen3-tts-jax serve --random-weights KIND` on a free port until `stop()`."""

    def __init__(self, kind, tmp, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"serve-{kind}.log", "w+")
        self.proc = subprocess.Popen(
            [EXE, "serve", "--random-weights", kind, "--port", str(self.port), "--quiet",
             "--voices-dir", str(tmp / f"voices-{kind}"), "--max-new-tokens", str(TOKENS),
             "--max-batch-size", "1", "--batch-buckets", "1", "--min-prompt-bucket", "64", *args],
            env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while True:
            assert self.proc.poll() is None and time.time() < deadline, self.output()
            try:
                if get(self.url + "/health")["status"] == "ok":
                    return
            except OSError:
                time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def health(self) -> dict:
        return get(self.url + "/health")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1000,1250",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def custom_voice(tmp_path_factory):
    server = Serve("custom_voice", tmp_path_factory.mktemp("cv"), "--api-key", KEY)
    yield server
    server.stop()


def state(browser) -> dict:
    return browser.execute_script("return Object.assign({}, window.playground)")


def wait_for(browser, condition: str, timeout=WAIT, server=None):
    """Wait until the JavaScript expression `condition` (over `s`, the page's state) is true; an
    error shown in the page ends the wait unless the condition is about errors."""
    deadline = time.time() + timeout
    while not browser.execute_script(f"const s = window.playground; return !!(s && ({condition}))"):
        s = state(browser)
        if time.time() > deadline or s.get("error") and "error" not in condition:
            raise AssertionError(f"waiting for {condition}: {s}"
                                 + (f"\n{server.output()}" if server else ""))
        time.sleep(0.1)


def by_id(browser, name):
    return browser.find_element(By.ID, name)


def open_page(browser, server, key=KEY, ready=True):
    """Load the page; with `key`, as if it had been given in this session already."""
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    if key:
        browser.execute_script("sessionStorage.setItem('qwen3-tts-jax-api-key', arguments[0])",
                               key)
    browser.refresh()
    wait_for(browser, "s.ready" if ready else "s.kind !== null", 60)


def test_every_control_has_a_label(browser, custom_voice):
    open_page(browser, custom_voice)
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length)
                       && !e.getAttribute('aria-label') && !e.textContent.trim())
          .map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    # no framework, no CDN: every script and stylesheet comes from the server itself
    sources = browser.execute_script("""
        return [...document.querySelectorAll('script[src], link[href]')].map(e => e.src || e.href)""")
    assert sources and all(s.startswith((custom_voice.url + "/", "data:")) for s in sources)


def test_api_key_is_asked_once_per_session(browser, custom_voice):
    """With --api-key the voices answer 401: the page shows it and asks for the key, sends it as
    `Authorization: Bearer`, and keeps it for the session (a reload does not ask again)."""
    open_page(browser, custom_voice, key=None, ready=False)
    wait_for(browser, "s.error && s.error.status === 401", 60)
    assert by_id(browser, "key-form").is_displayed()
    assert "401" in by_id(browser, "error").text and "API key" in by_id(browser, "error").text
    assert browser.switch_to.active_element == by_id(browser, "api-key")
    by_id(browser, "api-key").send_keys(KEY + Keys.ENTER)
    wait_for(browser, "s.ready", 60)
    assert state(browser)["voices"] == ["aiden", "dylan", "eric", "ono_anna", "ryan", "serena",
                                        "sohee", "uncle_fu", "vivian"]
    assert not by_id(browser, "key-form").is_displayed()
    assert not by_id(browser, "error").is_displayed()
    browser.refresh()
    wait_for(browser, "s.ready", 60)
    assert not by_id(browser, "key-form").is_displayed()


def test_empty_text_shows_the_servers_error(browser, custom_voice):
    open_page(browser, custom_voice)
    text = by_id(browser, "text")
    text.clear()
    by_id(browser, "speak").click()
    wait_for(browser, "s.status === 'error'", 60)
    message = by_id(browser, "error").text
    assert "400" in message and "“input”" in message and "`input` is empty" in message, message
    assert state(browser)["error"]["param"] == "input"
    assert text.get_attribute("aria-invalid") == "true"
    assert custom_voice.health()["stats"]["requests"] == 0     # refused before any device work


def page_wav(browser) -> bytes:
    """The bytes behind the page's "Download WAV" link (a blob: URL built in JavaScript)."""
    data = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download').href).then(r => r.arrayBuffer()).then(b => {
          let s = ''; const u = new Uint8Array(b);
          for (let i = 0; i < u.length; i += 8192) s += String.fromCharCode(...u.subarray(i, i + 8192));
          done(btoa(s));
        });""")
    return base64.b64decode(data)


def speech(server, body) -> bytes:
    """The pcm of POST /v1/audio/speech (with the key) for `body`."""
    body = dict(body, model="qwen3-tts", response_format="pcm")
    req = urllib.request.Request(server.url + "/v1/audio/speech", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        return r.read()


def test_speak_streams_plays_and_downloads(browser, custom_voice, tmp_path):
    """Pick a voice, type, Speak: pcm arrives, is scheduled back to back on the WebAudio clock and
    plays; the metrics show; the WAV built in the page holds exactly the server's audio for the
    same request (seeded)."""
    open_page(browser, custom_voice)
    browser.set_script_timeout(60)
    Select(by_id(browser, "voice")).select_by_value("vivian")
    Select(by_id(browser, "language")).select_by_value("english")
    by_id(browser, "settings").find_element(By.TAG_NAME, "summary").click()   # folded away
    by_id(browser, "set-seed").send_keys("7")
    text = by_id(browser, "text")
    text.clear()
    text.send_keys("Hello from the playground.")
    by_id(browser, "speak").click()
    wait_for(browser, "s.samplesPlayed > 0", server=custom_voice)   # a piece ended playing
    wait_for(browser, "s.status === 'done'", server=custom_voice)
    s = state(browser)
    assert s["error"] is None
    assert s["samplesReceived"] == s["samplesScheduled"] == s["frames"] * 1920 > 0
    assert s["firstAudioMs"] > 0 and s["rtf"] > 0 and s["pieces"] >= 2
    assert by_id(browser, "m-ttfa").text == browser.execute_script(
        "return Math.round(window.playground.firstAudioMs) + ' ms'")
    assert by_id(browser, "m-frames").text == str(s["frames"])
    assert by_id(browser, "m-rtf").text.startswith(f"{s['rtf']:.2f} (")
    assert "than real time" in by_id(browser, "m-rtf").text
    # pieces follow each other on the audio clock: the span they cover is the audio's length
    # plus the gaps where the audio ran dry (underruns)
    span = s["playEnd"] - s["playStart"]
    assert abs(span - s["samplesScheduled"] / 24000 - s["gapSeconds"]) < 1e-3, s
    assert (s["gapSeconds"] > 0) == (s["underruns"] > 0)
    wav = page_wav(browser)
    assert len(wav) == s["wavBytes"] == 44 + 2 * s["samplesReceived"]
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt " and wav[36:40] == b"data"
    assert struct.unpack("<IHHIIHH", wav[16:36]) == (16, 1, 1, 24000, 48000, 2, 16)
    assert wav[44:] == speech(custom_voice, {"input": "Hello from the playground.",
                                             "voice": "vivian", "language": "english",
                                             "seed": 7})
    wave, sr = sf.read(io.BytesIO(wav))
    assert sr == 24000 and len(wave) == s["samplesReceived"] and np.abs(wave).max() > 0.01
    assert by_id(browser, "download").is_displayed()
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if SCREENSHOT:
        shutil.copy(tmp_path / "playground.png", SCREENSHOT)


def test_pcm_split_at_odd_bytes(browser, custom_voice):
    """fetch may hand the stream over in pieces of any length: a sample split between two
    pieces is joined."""
    open_page(browser, custom_voice)
    got = browser.execute_script("""
        resetPlayback();
        for (const piece of [[1, 0, 2], [0, 255], [255], [0], [128]]) receive(new Uint8Array(piece));
        const out = play.pcm.flatMap((a) => [...a]);
        resetPlayback();
        return out;""")
    assert got == [1, 2, -1, -32768]


def test_stop_cancels_the_request(browser, custom_voice):
    open_page(browser, custom_voice)
    before = custom_voice.health()["stats"]
    by_id(browser, "speak").click()
    wait_for(browser, "s.samplesReceived > 0", server=custom_voice)
    by_id(browser, "stop").click()
    s = state(browser)
    assert s["status"] == "stopped" and by_id(browser, "stop").get_attribute("disabled")
    deadline = time.time() + 60
    while custom_voice.health()["stats"]["cancelled"] == before["cancelled"]:
        assert time.time() < deadline, custom_voice.health()
        time.sleep(0.2)
    after = custom_voice.health()["stats"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"]
    time.sleep(0.5)
    assert state(browser)["samplesReceived"] < TOKENS * 1920       # no more audio after Stop


def test_text_streaming_over_the_websocket(browser, custom_voice):
    """The second mode: text typed in pieces goes over the WebSocket as it is typed; audio comes
    back and plays; "End of text" ends it and the server's frame count shows. The audio is that
    of the whole text spoken in the streaming text mode (same seed)."""
    open_page(browser, custom_voice)
    browser.set_script_timeout(60)
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=ws]").click()
    assert by_id(browser, "speak").text == "Start session"
    Select(by_id(browser, "voice")).select_by_value("ryan")
    by_id(browser, "settings").find_element(By.TAG_NAME, "summary").click()
    by_id(browser, "set-seed").send_keys("3")
    text = by_id(browser, "text")
    text.clear()
    text.send_keys("Hello")
    by_id(browser, "speak").click()
    wait_for(browser, "s.status === 'connecting' && s.sentText === 'Hello'", 60)
    for piece in (" there,", " my friend", "."):
        text.send_keys(piece)
        time.sleep(0.2)
    wait_for(browser, "s.sentText === 'Hello there, my friend.'", 30)
    by_id(browser, "end").click()
    wait_for(browser, "s.status === 'done'", server=custom_voice)
    s = state(browser)
    assert s["error"] is None and s["frames"] > 0
    assert s["samplesReceived"] == s["samplesScheduled"] == s["frames"] * 1920
    wait_for(browser, "s.samplesPlayed > 0", 60)
    assert page_wav(browser)[44:] == speech(custom_voice, {
        "input": "Hello there, my friend.", "voice": "ryan", "seed": 3,
        "non_streaming_mode": False})


def test_a_text_session_in_segments(browser, custom_voice):
    """segment_chars from the settings reaches the text session: the text typed in pieces is
    said in the segments of the whole text, the audio of the same request over HTTP."""
    open_page(browser, custom_voice)
    browser.set_script_timeout(60)
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=ws]").click()
    Select(by_id(browser, "voice")).select_by_value("ryan")
    by_id(browser, "settings").find_element(By.TAG_NAME, "summary").click()
    for field, value in (("seed", "5"), ("segment_chars", "20"), ("segment_pause", "0.1")):
        by_id(browser, f"set-{field}").clear()
        by_id(browser, f"set-{field}").send_keys(value)
    text = by_id(browser, "text")
    text.clear()
    text.send_keys("One sentence here.")
    by_id(browser, "speak").click()
    wait_for(browser, "s.sentText === 'One sentence here.'", 60)
    text.send_keys(" And another one.")
    wait_for(browser, "s.sentText === 'One sentence here. And another one.'", 30)
    by_id(browser, "end").click()
    wait_for(browser, "s.status === 'done'", server=custom_voice)
    assert state(browser)["error"] is None
    assert page_wav(browser)[44:] == speech(custom_voice, {
        "input": "One sentence here. And another one.", "voice": "ryan", "seed": 5,
        "non_streaming_mode": False, "segment_chars": 20, "segment_pause": 0.1})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    server = Serve("base", tmp_path_factory.mktemp("base"))
    yield server
    server.stop()


def test_base_registers_a_voice_from_a_file_and_speaks_with_it(browser, base, tmp_path):
    ref = tmp_path / "me.wav"
    t = np.arange(36000) / 24000
    sf.write(str(ref), 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2,
             24000)
    open_page(browser, base, key=None)
    assert by_id(browser, "register-form").is_displayed()
    assert not by_id(browser, "instructions-row").is_displayed()     # cloning has none
    assert state(browser)["voices"] == []
    by_id(browser, "reg-name").send_keys("me")
    by_id(browser, "reg-file").send_keys(str(ref))
    by_id(browser, "register").click()                 # no transcript, x-vector not ticked
    wait_for(browser, "s.error && s.error.param === 'transcript'", 30)
    by_id(browser, "reg-xvector").click()
    by_id(browser, "register").click()
    wait_for(browser, "s.registered === 'me'", server=base)
    assert state(browser)["voices"] == ["me"]
    assert Select(by_id(browser, "voice")).first_selected_option.get_attribute("value") == "me"
    assert get(base.url + "/v1/audio/voices")["data"][0]["mode"] == "x_vector_only"
    by_id(browser, "register").click()                 # the same name again: the server's 409
    wait_for(browser, "s.error && s.error.status === 409", 60)
    assert "“name”" in by_id(browser, "error").text
    by_id(browser, "speak").click()
    wait_for(browser, "s.samplesPlayed > 0", server=base)
    wait_for(browser, "s.status === 'done'", server=base)
    s = state(browser)
    assert s["error"] is None and s["samplesReceived"] == s["frames"] * 1920 > 0
    # from the microphone (Chromium's fake device: a beep), recorded to WAV in the page
    by_id(browser, "reg-name").clear()
    by_id(browser, "reg-name").send_keys("mic")
    by_id(browser, "reg-file").clear()
    by_id(browser, "record").click()
    wait_for(browser, "document.getElementById('record').getAttribute('aria-pressed') === 'true'",
             30)
    time.sleep(1.5)
    by_id(browser, "record").click()
    wait_for(browser, "document.getElementById('record-status').textContent.startsWith("
                      "'Recorded')", 30)
    by_id(browser, "register").click()
    wait_for(browser, "s.registered === 'mic'", server=base)
    assert state(browser)["voices"] == ["me", "mic"]


def test_the_page_adapts_to_the_checkpoint(browser, custom_voice):
    """VoiceDesign: no voice list, a required description; a 0.6B CustomVoice: no instructions;
    Base: the registration form and no instructions."""
    open_page(browser, custom_voice)
    shown = """
        adaptToModel();
        const shown = (id) => !document.getElementById(id).hidden;
        return [shown('voice-row'), shown('instructions-row'), shown('register-form'),
                document.getElementById('instructions-label').textContent,
                document.getElementById('instructions').required];"""
    assert browser.execute_script(shown) == [True, True, False, "Instructions (optional)", False]
    browser.execute_script("window.playground.kind = 'voice_design'")
    assert browser.execute_script(shown) == [False, True, False, "Voice description", True]
    browser.execute_script("window.playground.kind = 'custom_voice'; window.playground.size = '0b6'")
    assert browser.execute_script(shown)[:3] == [True, False, False]
    browser.execute_script("window.playground.kind = 'base'")
    assert browser.execute_script(shown)[:3] == [True, False, True]
