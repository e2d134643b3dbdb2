"""A local page to listen and compare: a script and prompt voices in, one synthesis per model out, side by side.

`Studio` holds what answers: one or two models (two checkpoints, or two LoRA adapters over one base switched
with peft's `set_adapter`, never merged), the tokenizer, the codec and, when named, the metric models. It
takes one request at a time and bounds every input as `infer.py` does: the script's length, each prompt
clip's size, format and duration (read from its header before decoding), the rows generation may need. `serve`
puts it behind Python's HTTP server: `GET /` the page, `POST /api/generate` (JSON in and out),
`GET /audio/<id>_<label>.wav` the results, from a private folder removed when the server stops.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import soundfile as sf
import torch

from moss.audio import SAMPLE_RATE, resample
from moss.evaluation import Dialogue, score_dialogues
from moss.inference import ItemError, Synthesizer, parse_item
from moss.studio.page import render_page
from moss.text.normalize import normalizer

log = logging.getLogger(__name__)
AUDIO_NAME = re.compile(r"^[0-9a-f]{16}_[A-Za-z0-9_.-]{1,64}\.wav$")
CLIP_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
METRICS = ("cer", "wer", "sim_s1", "sim_s2", "switch_acc")


@dataclass
class Voice:
    """One answering model: a MossTTSD, or (with `peft`) the shared base with the LoRA adapter `adapter` switched in.

    `model` is what generates: with an adapter, the base MossTTSD inside `peft`, its LoRA layers in place.
    """

    label: str
    model: torch.nn.Module
    adapter: str | None = None
    peft: torch.nn.Module | None = None


class Studio:
    """Synthesise one request with every voice (see the module docstring).

    Args:
        voices: the models that answer, in page order.
        tokenizer, codec, generation: as for `Synthesizer` (one seed for all voices).
        normalize: the script normalisation (`v0.5`, `v0.7`, None).
        judges: (ASR, speaker model) or Nones: metrics shown beside each result.
        max_text_chars, max_clip_bytes, max_prompt_seconds, max_rows: the input bounds.
        engine: the decoding engine.
    """

    def __init__(
        self,
        voices: list[Voice],
        tokenizer,
        codec,
        generation,
        normalize: str | None = "v0.5",
        judges=(None, None),
        max_text_chars: int = 5000,
        max_clip_bytes: int = 32 << 20,
        max_prompt_seconds: float = 120.0,
        max_rows: int | None = None,
        engine: str = "auto",
    ):
        self.voices, self.tokenizer, self.codec, self.generation = voices, tokenizer, codec, generation
        self.normalize, self.judges, self.engine = normalize, judges, engine
        self.max_text_chars, self.max_clip_bytes = max_text_chars, max_clip_bytes
        self.max_prompt_seconds, self.max_rows = max_prompt_seconds, max_rows
        self.folder = Path(tempfile.mkdtemp(prefix="moss-studio-"))
        self._lock = threading.Lock()

    @property
    def labels(self) -> list[str]:
        return [voice.label for voice in self.voices]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def generate(self, request: dict) -> dict:
        """`{"results": [{label, audio, duration_s, metrics} | {label, error}]}`, or `{"error": ...}` for bad input."""
        try:
            with tempfile.TemporaryDirectory(dir=self.folder) as clips:
                item = self._item(request, Path(clips))
                with self._lock:
                    return {"results": [self._synthesize(voice, item) for voice in self.voices]}
        except ItemError as err:
            return {"error": str(err)}

    def _item(self, request: dict, clips: Path):
        if not isinstance(request, dict):
            raise ItemError("the request must be a JSON object")
        text = request.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ItemError("the script is empty: type a dialogue, e.g. [S1]Hello.[S2]Hi!")
        if len(text) > self.max_text_chars:
            raise ItemError(f"the script has {len(text)} characters; at most {self.max_text_chars}")
        data = {"text": text}
        speakers = request.get("speakers") or []
        if speakers:
            if not isinstance(speakers, list) or len(speakers) != 2 or not all(isinstance(s, dict) for s in speakers):
                raise ItemError("give a prompt clip for both speakers, or for neither")
            for n, speaker in enumerate(speakers, start=1):
                data[f"prompt_audio_speaker{n}"] = self._clip(speaker, n, clips)
                if isinstance(speaker.get("text"), str) and speaker["text"].strip():
                    data[f"prompt_text_speaker{n}"] = speaker["text"]
        item = parse_item(data, 0, base_path=str(clips), max_prompt_seconds=self.max_prompt_seconds)
        if self.max_rows and (problem := self._synthesizer(self.voices[0]).too_long(item, self.max_rows)):
            raise ItemError(problem)
        return item

    def _clip(self, speaker: dict, n: int, clips: Path) -> str:
        """Write speaker n's uploaded clip (base64) into `clips`, bounded, with the suffix its name gives."""
        encoded = speaker.get("audio")
        if not isinstance(encoded, str) or not encoded:
            raise ItemError(f"speaker {n} has no prompt clip: give both speakers one, or neither")
        if len(encoded) > self.max_clip_bytes * 4 // 3 + 4:
            raise ItemError(f"speaker {n}'s clip is over {self.max_clip_bytes >> 20} MB")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ItemError(f"speaker {n}'s clip is not valid base64") from None
        suffix = Path(str(speaker.get("name") or "")).suffix.lower()
        path = clips / f"speaker{n}{suffix if suffix in CLIP_SUFFIXES else '.wav'}"
        path.write_bytes(raw)
        return path.name

    def _synthesizer(self, voice: Voice) -> Synthesizer:
        prompt_normalizer = normalizer(self.normalize)
        return Synthesizer(
            voice.model, self.tokenizer, self.codec, self.generation, prompt_normalizer, 1, engine=self.engine
        )

    def _synthesize(self, voice: Voice, item) -> dict:
        if voice.peft is not None:
            voice.peft.set_adapter(
                voice.adapter
            )  # a switch of peft's layers: the base weights are shared, never merged
        waves = []
        self._synthesizer(voice).synthesize([item], lambda _, wave: waves.append(wave.float().cpu().numpy()))
        wave = waves[0]
        if not wave.size:
            return {"label": voice.label, "error": "generated no audio (the model ended at once)"}
        name = f"{secrets.token_hex(8)}_{re.sub(r'[^A-Za-z0-9_.-]', '_', voice.label)[:64]}.wav"
        sf.write(self.folder / name, wave, self.codec.output_sample_rate)
        seconds = len(wave) / self.codec.output_sample_rate
        result = {"label": voice.label, "audio": f"audio/{name}", "duration_s": seconds, "metrics": {}}
        if any(self.judges):
            clip = resample(wave, self.codec.output_sample_rate, SAMPLE_RATE)
            dialogue = Dialogue(0, str(item.source["text"]), clip, item.voices)
            scores = score_dialogues([dialogue], SAMPLE_RATE, None, *self.judges)["aggregate"]
            result["metrics"] = {k: v for k, v in scores.items() if k in METRICS and v is not None}
        return result

    def audio(self, name: str) -> bytes | None:
        """A result file by name (None for anything else: the name is checked, never joined blindly)."""
        if not AUDIO_NAME.match(name) or not (self.folder / name).is_file():
            return None
        return (self.folder / name).read_bytes()


MAX_JSON_DEPTH = 16  # the request is an object holding a list of two speaker objects: 3 levels
MAX_NUMBER_CHARS = 32  # digits of one JSON number (Python would build a million-digit int if asked)
STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class RequestError(ValueError):
    """A request refused before it reaches the studio: (HTTP status, message)."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def parse_json(body: bytes) -> object:
    """The request body as JSON, bounded: nesting, number sizes, no NaN/Infinity (`RequestError` 400 otherwise)."""
    depth = most = 0
    for bracket in re.findall(rb"[\[\]{}]", STRINGS.sub(b'""', body)):  # brackets outside strings
        depth += 1 if bracket in b"[{" else -1
        most = max(most, depth)
    if most > MAX_JSON_DEPTH:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the request nests {most} levels deep; at most {MAX_JSON_DEPTH}")

    def number(kind):
        def parse(text: str):
            if len(text) > MAX_NUMBER_CHARS:
                raise ValueError(f"a number of {len(text)} characters")
            return kind(text)

        return parse

    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(body, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the request is not JSON this page sends ({err})") from None


def local_host(host: str, bound: str) -> bool:
    """Whether a request's `Host` names this machine as the user reached it.

    The bound address, localhost, or an IP address; a DNS name pointing here is how another web site reaches a
    local server (DNS rebinding).
    """
    import ipaddress

    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name in ("localhost", bound.lower()):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class StudioServer(ThreadingHTTPServer):
    """Python's threaded HTTP server with a backlog for a page's parallel requests and a fast stop.

    Handler threads are daemons and are not waited for at close (a browser's idle connection, or a synthesis
    in progress, held SIGTERM up for minutes); a client that leaves early is logged, not a traceback.
    """

    request_queue_size = 128
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address) -> None:
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError | TimeoutError):
            log.info("%s left before the answer (%s)", client_address[0], type(err).__name__)
        else:
            log.exception("request from %s failed", client_address[0])


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 7860, max_request_bytes: int = 80 << 20):
    """An HTTP server for `studio` (not started: call `serve_forever`, or run it in a thread).

    Only the page itself may use it: a request whose `Host` is not this machine's (DNS rebinding), or that
    another web site sent (`Origin`, `Sec-Fetch-Site`), is refused with 403; a generation request must be
    `application/json`, which a foreign page cannot send without a CORS preflight this server never grants.
    """
    page = render_page(studio.labels).encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds an idle or trickling connection may hold a thread

        def do_GET(self):  # noqa: N802 - http.server's name
            if refused := self._foreign(navigation=self.path in ("/", "/index.html")):
                return self._json(HTTPStatus.FORBIDDEN, {"error": refused})
            if self.path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            if self.path.startswith("/audio/") and (data := studio.audio(self.path[len("/audio/") :])) is not None:
                return self._send(HTTPStatus.OK, data, "audio/wav")
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            if refused := self._foreign(navigation=False):
                return self._json(HTTPStatus.FORBIDDEN, {"error": refused})
            if self.path != "/api/generate":
                return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send the request as application/json"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 < length <= max_request_bytes:
                return self._json(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else HTTPStatus.BAD_REQUEST,
                    {"error": f"a request must carry 1 byte to {max_request_bytes >> 20} MB, got {length}"},
                )
            try:
                request = parse_json(self.rfile.read(length))
            except RequestError as err:
                return self._json(err.status, {"error": str(err)})
            try:
                answer = studio.generate(request)
            except Exception as err:  # noqa: BLE001 - the page shows it; the server keeps serving
                log.exception("generation failed")
                answer = {"error": f"generation failed: {type(err).__name__}: {err}"}
            self._json(HTTPStatus.BAD_REQUEST if "error" in answer else HTTPStatus.OK, answer)

        def _foreign(self, navigation: bool) -> str | None:
            """Why the request did not come from this page (None: it did). A top-level visit may come from a link."""
            given = self.headers.get("Host") or ""
            if not local_host(given, host):
                return f"Host {given!r} is not this machine's address; open the page as http://{host}:{port or 'PORT'}/"
            site = (self.headers.get("Sec-Fetch-Site") or "same-origin").lower()
            if site not in ("same-origin", "none") and not (
                navigation and self.headers.get("Sec-Fetch-Mode") == "navigate"
            ):
                return "requests from other web sites are refused"
            origin = self.headers.get("Origin")
            if origin is not None and not navigation and origin.lower() != f"http://{given.lower()}":
                return f"requests from {origin} are refused"
            return None

        def _json(self, status, body: dict):
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status, body: bytes, kind: str):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")  # no other site may frame the page to click it
            self.end_headers()
            self.wfile.write(body)

        def log_request(self, code="-", size="-"):
            log.info('%s "%s %s" %s', self.address_string(), self.command, self.path[:200], int(code))

        def log_message(self, format, *args):  # noqa: A002 - http.server's signature
            log.debug("%s %s", self.address_string(), format % args)

    return StudioServer((host, port), Handler)
