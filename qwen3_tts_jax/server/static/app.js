// The playground of `qwen3-tts-jax serve`: plain JavaScript over the server's public API.
//   GET /health                      the model type (CustomVoice, VoiceDesign, Base)
//   GET, POST /v1/audio/voices       preset speakers or registered voices; register one (Base)
//   POST /v1/audio/speech            response_format pcm (s16le, 24 kHz, mono), read as it streams
//   WS /v1/audio/speech/stream       text sent in pieces, pcm back as it is generated
// Audio is played with WebAudio, each piece scheduled right after the previous one (no gaps
// while the audio arrives faster than it plays). `window.playground` is the page's state, which
// the browser test reads.
"use strict";

const RATE = 24000;              // samples per second of the server's pcm
const FRAME = 1920;              // samples per code frame (12.5 frames a second)
const LEAD = 0.15;               // seconds of audio queued before the first piece plays
const KINDS = {custom_voice: "CustomVoice", voice_design: "VoiceDesign", base: "Base"};
// the control that sets each request field, for errors that name a field (`param`)
const FIELD_CONTROLS = {
  input: "text", text: "text", voice: "voice", instructions: "instructions",
  language: "language", non_streaming_mode: "text-mode", name: "reg-name",
  audio_sample: "reg-file", transcript: "reg-transcript", ref_text: "reg-transcript",
  do_sample: "set-greedy", subtalker_dosample: "set-greedy",
};

const $ = (id) => document.getElementById(id);

const state = window.playground = {
  ready: false,            // /health and the voices are loaded
  kind: null,              // tts_model_type
  size: document.body.dataset.modelSize || null,
  model: "qwen3-tts",
  voices: [],
  status: "idle",          // idle | connecting | streaming | done | stopped | error
  mode: "http",
  error: null,             // {status, message, param} of the last error shown
  samplesReceived: 0,
  samplesScheduled: 0,
  samplesPlayed: 0,        // counted as each scheduled piece ends playing
  pieces: 0,
  underruns: 0,            // pieces that came after the audio before them had ended
  gapSeconds: 0,           // the silence those left
  playStart: null,         // the audio clock's time of the first piece
  playEnd: null,           // ... and of the end of the last piece scheduled
  firstAudioMs: null,
  frames: null,
  rtf: null,
  wavBytes: null,
  sentText: "",            // WebSocket mode: the text sent so far
  registered: null,        // the last voice registered
};

// ------------------------------------------------------------------------------ API key
function apiKey() {
  return sessionStorage.getItem("qwen3-tts-jax-api-key");
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

function askForKey() {
  const form = $("key-form");
  form.hidden = false;
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem("qwen3-tts-jax-api-key", key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  clearError();
  loadVoices();
});

// ------------------------------------------------------------------------------ errors
function clearError() {
  state.error = null;
  $("error").hidden = true;
  $("error").textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

// Show an error in words: the status, the server's message and the field it names.
function showError(status, message, param) {
  state.error = {status: status, message: message, param: param || null};
  const box = $("error");
  let text = status ? `The server answered ${status}` : "Error";
  if (param) text += ` about the field “${param}”`;
  text += ": " + message;
  box.textContent = text;
  box.hidden = false;
  const control = param && ($(FIELD_CONTROLS[param] || "set-" + param));
  if (control) {
    control.setAttribute("aria-invalid", "true");
    if (control.id.startsWith("set-")) $("settings").open = true;
  }
  if (status === 401) askForKey();
}

async function errorOf(response) {
  let message = response.statusText || "request failed", param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param || null;
    }
  } catch (e) { /* not JSON: the status text */ }
  return {status: response.status, message: message, param: param};
}

// ------------------------------------------------------------------------------ model and voices
async function loadHealth() {
  const r = await fetch("/health");
  if (!r.ok) throw new Error(`GET /health answered ${r.status}`);
  const health = await r.json();
  state.kind = health.tts_model_type;
  state.model = health.model || state.model;
  const size = state.size ? ` ${state.size.replace("b", ".")}B` : "";     // "1b7": 1.7B
  $("model-info").textContent =
    `Model “${state.model}”: ${KINDS[state.kind] || state.kind}${size}. ` +
    (state.kind === "custom_voice" ? "Pick a preset speaker." :
     state.kind === "voice_design" ? "Describe the voice in words." :
     "Register a voice from reference audio, then speak with it.");
  adaptToModel();
}

function adaptToModel() {
  const kind = state.kind;
  $("voice-row").hidden = kind === "voice_design";
  $("register-form").hidden = kind !== "base";
  const instructions = $("instructions");
  instructions.required = kind === "voice_design";
  if (kind === "voice_design") {
    $("instructions-label").textContent = "Voice description";
    instructions.placeholder = "A warm, low female voice, speaking slowly.";
    $("instructions-row").hidden = false;
  } else if (kind === "custom_voice") {
    $("instructions-label").textContent = "Instructions (optional)";
    instructions.placeholder = "Speak happily, a little fast.";
    // a 0.6B CustomVoice model ignores instructions
    $("instructions-row").hidden = state.size === "0b6";
  } else {
    $("instructions-row").hidden = true;   // cloning has no instructions
  }
  const recordable = !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia &&
                        window.MediaRecorder);
  $("record").hidden = !recordable;
  if (!recordable) {
    $("record-status").textContent =
      "Recording needs a browser that allows the microphone here (localhost or HTTPS).";
  }
}

async function loadVoices(select) {
  const r = await fetch("/v1/audio/voices", {headers: authHeaders()});
  if (!r.ok) {
    const e = await errorOf(r);
    showError(e.status, e.message, e.param);
    return;
  }
  const body = await r.json();
  state.voices = body.data.map((v) => v.id);
  const list = $("voice");
  const keep = select || list.value;
  list.replaceChildren();
  if (!state.voices.length) {
    const option = new Option(state.kind === "base" ? "(register a voice first)" : "(none)", "");
    list.add(option);
  }
  for (const v of body.data) {
    const label = v.mode ? `${v.name} (${v.mode === "icl" ? "with transcript" : "x-vector only"})`
                         : v.name;
    list.add(new Option(label, v.id));
  }
  if (state.voices.includes(keep)) list.value = keep;
  state.ready = true;
}

// ------------------------------------------------------------------------------ request fields
function settings() {
  const out = {};
  for (const input of document.querySelectorAll("#settings input[data-field]")) {
    if (input.value === "") continue;
    const value = Number(input.value);
    out[input.dataset.field] = Number.isFinite(value) ? value : input.value;
  }
  if ($("set-greedy").checked) {
    out.do_sample = false;
    out.subtalker_dosample = false;
  }
  return out;
}

function speechFields() {
  const fields = {model: state.model, language: $("language").value};
  if (state.kind !== "voice_design") fields.voice = $("voice").value;
  const instructions = $("instructions").value.trim();
  if (!$("instructions-row").hidden && instructions) fields.instructions = instructions;
  return Object.assign(fields, settings());
}

// ------------------------------------------------------------------------------ playback
const play = {ctx: null, next: 0, sources: [], pcm: [], odd: null, started: 0,
              controller: null, socket: null, finished: false};

function audioContext() {
  if (!play.ctx) play.ctx = new (window.AudioContext || window.webkitAudioContext)();
  if (play.ctx.state === "suspended") play.ctx.resume();
  return play.ctx;
}

function resetPlayback() {
  for (const s of play.sources) {
    try { s.stop(); } catch (e) { /* already ended */ }
  }
  Object.assign(play, {next: 0, sources: [], pcm: [], odd: null, finished: false});
  Object.assign(state, {samplesReceived: 0, samplesScheduled: 0, samplesPlayed: 0, pieces: 0,
                        underruns: 0, gapSeconds: 0, playStart: null, playEnd: null,
                        firstAudioMs: null, frames: null, rtf: null, wavBytes: null});
  const link = $("download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.hidden = true;
  link.href = "#";
  showMetrics();
}

// Bytes of s16le pcm as they arrive (any split, odd lengths included) -> scheduled audio.
function receive(bytes) {
  if (play.odd !== null) {
    const joined = new Uint8Array(bytes.length + 1);
    joined[0] = play.odd;
    joined.set(bytes, 1);
    bytes = joined;
    play.odd = null;
  }
  if (bytes.length % 2) {
    play.odd = bytes[bytes.length - 1];
    bytes = bytes.subarray(0, bytes.length - 1);
  }
  const n = bytes.length / 2;
  if (!n) return;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const samples = new Int16Array(n);
  for (let i = 0; i < n; i++) samples[i] = view.getInt16(2 * i, true);
  play.pcm.push(samples);
  if (state.firstAudioMs === null) state.firstAudioMs = performance.now() - play.started;
  state.samplesReceived += n;
  schedule(samples);
  if (state.status === "connecting") setStatus("streaming", "Playing while it is generated…");
  showMetrics();
}

function schedule(samples) {
  const ctx = audioContext();
  const buffer = ctx.createBuffer(1, samples.length, RATE);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  // Right after the previous piece; when the audio ran dry (or at the start), a little ahead.
  if (play.next < ctx.currentTime + 0.01) {
    const start = ctx.currentTime + LEAD;
    if (state.pieces > 0) {
      state.underruns += 1;
      state.gapSeconds += start - play.next;
    } else {
      state.playStart = start;
    }
    play.next = start;
  }
  source.start(play.next);
  play.next += buffer.duration;
  state.playEnd = play.next;
  source.onended = () => {
    state.samplesPlayed += samples.length;
    play.sources = play.sources.filter((s) => s !== source);
    updateStop();
    if (play.finished && !play.sources.length && state.status === "done") {
      setStatus("done", `Done: ${seconds(state.samplesPlayed)} played.`);
    }
  };
  play.sources.push(source);
  state.pieces += 1;
  state.samplesScheduled += samples.length;
}

function seconds(samples) {
  return (samples / RATE).toFixed(2) + " s";
}

function showMetrics() {
  $("m-ttfa").textContent = state.firstAudioMs === null ? "–"
    : `${Math.round(state.firstAudioMs)} ms`;
  const frames = state.frames !== null ? state.frames : Math.floor(state.samplesReceived / FRAME);
  $("m-frames").textContent = state.samplesReceived || state.frames !== null ? String(frames) : "–";
  $("m-seconds").textContent = state.samplesReceived ? seconds(state.samplesReceived) : "–";
  // seconds of generating (from the click) per second of audio: below 1 is faster than real time
  $("m-rtf").textContent = state.rtf === null ? "–" : `${state.rtf.toFixed(2)} (` +
    (state.rtf < 1 ? `${(1 / state.rtf).toFixed(1)}× faster` : `${state.rtf.toFixed(1)}× slower`) +
    " than real time)";
}

function finish(frames) {
  const wall = (performance.now() - play.started) / 1000;
  const audio = state.samplesReceived / RATE;
  state.frames = frames !== undefined ? frames : Math.round(state.samplesReceived / FRAME);
  state.rtf = audio > 0 ? wall / audio : null;
  play.finished = true;
  makeWav();
  showMetrics();
  setStatus("done", `Done: ${seconds(state.samplesReceived)} of audio in ${wall.toFixed(2)} s.`);
  setBusy(false);
}

// The finished utterance as a 16-bit mono WAV file, for the download link.
function makeWav() {
  const bytes = state.samplesReceived * 2;
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => { for (let i = 0; i < 4; i++) header.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); header.setUint32(4, 36 + bytes, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true);
  header.setUint16(22, 1, true); header.setUint32(24, RATE, true);
  header.setUint32(28, RATE * 2, true); header.setUint16(32, 2, true);
  header.setUint16(34, 16, true); text(36, "data"); header.setUint32(40, bytes, true);
  const blob = new Blob([header.buffer, ...play.pcm.map((s) => s.buffer)], {type: "audio/wav"});
  state.wavBytes = blob.size;
  const link = $("download");
  link.href = URL.createObjectURL(blob);
  link.hidden = false;
}

function setStatus(status, words) {
  state.status = status;
  $("status").textContent = words;
}

let busy = false;

// Stop stays usable while a request runs and while its audio still plays.
function setBusy(now) {
  busy = now;
  $("speak").disabled = busy;
  $("end").disabled = !(busy && state.mode === "ws");
  updateStop();
}

function updateStop() {
  $("stop").disabled = !(busy || play.sources.length);
}

// ------------------------------------------------------------------------------ HTTP mode
async function speak() {
  clearError();
  resetPlayback();
  audioContext();                      // created on the click: browsers allow audio then
  const body = Object.assign(speechFields(), {input: $("text").value, response_format: "pcm"});
  const mode = $("text-mode").value;
  if (mode) body.non_streaming_mode = mode === "non-streaming";
  play.controller = new AbortController();
  play.started = performance.now();
  setBusy(true);
  setStatus("connecting", "Waiting for the first audio…");
  let response;
  try {
    response = await fetch("/v1/audio/speech", {
      method: "POST", body: JSON.stringify(body), signal: play.controller.signal,
      headers: authHeaders({"Content-Type": "application/json"})});
    if (!response.ok) {
      const e = await errorOf(response);
      showError(e.status, e.message, e.param);
      setStatus("error", "Refused: see the message below.");
      setBusy(false);
      return;
    }
    const reader = response.body.getReader();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      receive(value);
    }
    finish();
  } catch (e) {
    if (e.name === "AbortError") return;          // Stop
    showError(null, `the connection failed: ${e.message}`);
    setStatus("error", "The stream broke off.");
    setBusy(false);
  }
}

function stop() {
  if (play.controller) play.controller.abort();
  if (play.socket) play.socket.close(1000, "stopped");
  play.controller = play.socket = null;
  for (const s of play.sources) {
    try { s.stop(); } catch (e) { /* already ended */ }
  }
  play.sources = [];
  if (busy) setStatus("stopped", `Stopped after ${seconds(state.samplesReceived)} of audio.`);
  setBusy(false);
}

// ------------------------------------------------------------------------------ WebSocket mode
function startSession() {
  clearError();
  resetPlayback();
  audioContext();
  const key = apiKey();
  const url = new URL("/v1/audio/speech/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (key) url.searchParams.set("api_key", key);   // a browser cannot set a WebSocket's headers
  const socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  play.socket = socket;
  play.started = performance.now();
  state.sentText = "";
  setBusy(true);
  setStatus("connecting", "Session open: type, paste, then press “End of text”.");
  let ended = false;
  socket.onopen = () => {
    const first = speechFields();
    const text = $("text").value;
    if (text) first.input = text;
    state.sentText = text;
    socket.send(JSON.stringify(first));
  };
  socket.onmessage = (event) => {
    if (typeof event.data !== "string") {
      receive(new Uint8Array(event.data));
      return;
    }
    const msg = JSON.parse(event.data);
    if (msg.type === "done") {
      ended = true;
      play.socket = null;
      finish(msg.frames);
    } else if (msg.type === "error") {
      ended = true;
      play.socket = null;
      showError(msg.status, msg.message, msg.param);
      setStatus("error", "The session ended with an error.");
      setBusy(false);
    }
  };
  socket.onclose = (event) => {
    if (ended || play.socket !== socket) return;       // done, an error, or Stop
    play.socket = null;
    showError(null, event.code === 1006 || event.code === 1008
      ? "the WebSocket was refused or closed (is the API key right?)"
      : `the WebSocket closed (${event.code} ${event.reason})`);
    setStatus("error", "The session ended.");
    setBusy(false);
  };
}

// Text typed or pasted while a session is open: what was added at the end is sent.
$("text").addEventListener("input", () => {
  const socket = play.socket;
  if (state.mode !== "ws" || !socket || socket.readyState !== WebSocket.OPEN) return;
  const text = $("text").value;
  if (!text.startsWith(state.sentText)) {
    $("text-hint").textContent = "Only text added at the end is sent: the rest is already spoken.";
    return;
  }
  const piece = text.slice(state.sentText.length);
  if (!piece) return;
  socket.send(JSON.stringify({type: "text", text: piece}));
  state.sentText = text;
});

$("end").addEventListener("click", () => {
  const socket = play.socket;
  if (socket && socket.readyState === WebSocket.OPEN) {
    const text = $("text").value;
    const rest = text.startsWith(state.sentText) ? text.slice(state.sentText.length) : "";
    socket.send(JSON.stringify({type: "end", text: rest}));
    state.sentText = text;
    $("end").disabled = true;
    setStatus(state.status, "Text ended: the rest of the audio is coming.");
  }
});

function setMode(mode) {
  state.mode = mode;
  const ws = mode === "ws";
  $("speak").textContent = ws ? "Start session" : "Speak";
  $("end").hidden = !ws;
  $("text-mode").disabled = ws;
  $("text-mode-hint").textContent = ws ? "A text session always uses the streaming text mode." : "";
  $("text-label").textContent = ws ? "Text (sent as you type)" : "Text";
}

for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => setMode(radio.value));
}

// ------------------------------------------------------------------------------ voices (Base)
let recorded = null;           // a WAV Blob recorded from the microphone
let recorder = null;

async function toggleRecording() {
  const button = $("record");
  if (recorder) {
    recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({audio: true});
  } catch (e) {
    $("record-status").textContent = `The microphone is not available: ${e.message}`;
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (event) => chunks.push(event.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    button.textContent = "Record from the microphone";
    button.setAttribute("aria-pressed", "false");
    try {
      const audio = await audioContext().decodeAudioData(await new Blob(chunks).arrayBuffer());
      recorded = wavOf(audio);
      $("record-status").textContent =
        `Recorded ${audio.duration.toFixed(1)} s (used instead of a file).`;
    } catch (e) {
      $("record-status").textContent = `Could not read the recording: ${e.message}`;
    }
  };
  recorder.start();
  button.textContent = "Stop recording";
  button.setAttribute("aria-pressed", "true");
  $("record-status").textContent = "Recording…";
}

// An AudioBuffer (its first channel) as a 16-bit WAV Blob at its own sample rate.
function wavOf(audio) {
  const data = audio.getChannelData(0);
  const view = new DataView(new ArrayBuffer(44 + 2 * data.length));
  const text = (offset, s) => { for (let i = 0; i < 4; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * data.length, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true);
  view.setUint16(22, 1, true); view.setUint32(24, audio.sampleRate, true);
  view.setUint32(28, audio.sampleRate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * data.length, true);
  for (let i = 0; i < data.length; i++) {
    view.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, data[i])) * 32767, true);
  }
  return new Blob([view.buffer], {type: "audio/wav"});
}

async function register() {
  clearError();
  const name = $("reg-name").value.trim();
  const file = $("reg-file").files[0];
  const xvector = $("reg-xvector").checked;
  const transcript = $("reg-transcript").value.trim();
  if (!file && !recorded) {
    showError(null, "choose a reference audio file or record one", "audio_sample");
    return;
  }
  if (!xvector && !transcript) {
    showError(null, "write the words spoken in the reference, or tick “x-vector only”",
              "transcript");
    return;
  }
  const form = new FormData();
  form.append("name", name);
  form.append("audio_sample", file || recorded, file ? file.name : "recording.wav");
  if (!xvector) form.append("transcript", transcript);
  $("register").disabled = true;
  $("status").textContent = `Registering “${name}”: encoding the reference…`;
  try {
    const r = await fetch("/v1/audio/voices", {method: "POST", body: form, headers: authHeaders()});
    if (!r.ok) {
      const e = await errorOf(r);
      showError(e.status, e.message, e.param);
      $("status").textContent = "The voice was not registered.";
      return;
    }
    const voice = await r.json();
    state.registered = voice.id;
    await loadVoices(voice.id);
    $("status").textContent = `Registered “${voice.id}” ` +
      `(${voice.mode === "icl" ? "with its transcript" : "x-vector only"}).`;
  } finally {
    $("register").disabled = false;
  }
}

// ------------------------------------------------------------------------------ wiring
$("speech-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.mode === "ws") startSession(); else speak();
});
$("stop").addEventListener("click", stop);
$("record").addEventListener("click", toggleRecording);
$("register-form").addEventListener("submit", (event) => {
  event.preventDefault();
  register();
});
$("reg-xvector").addEventListener("change", () => {
  $("reg-transcript").disabled = $("reg-xvector").checked;
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !$("stop").disabled) stop();
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.id === "text" &&
      !$("speak").disabled) {
    event.preventDefault();
    $("speech-form").requestSubmit();
  }
});

(async () => {
  try {
    await loadHealth();
    await loadVoices();
  } catch (e) {
    $("model-info").textContent = `Cannot reach the server: ${e.message}`;
  }
})();
