"""The studio's answers without a browser: every input bounded, both voices answer, adapters switch unmerged."""

from __future__ import annotations

import http.client
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from app import build_studio
from moss.studio import serve
from tests.conftest import compose_config
from tests.studio.conftest import wav_base64

SCRIPT = "[S1]hello there[S2]hi how are you[S1]fine thanks"
SPOKEN_BY_BOTH_ADAPTERS = "[S1]Good morning.[S2]Morning to you!"  # random adapters end some scripts at once


def studio_for(models, *overrides):
    settings = [f"checkpoint={models / 'tuned'}", "codec=tiny", "max_seconds=3", "sampling={do_sample: false}"]
    return build_studio(compose_config("app", [*settings, *overrides]))


def decoded(studio, result) -> np.ndarray:
    wave, _ = sf.read(io.BytesIO(studio.audio(result["audio"].removeprefix("audio/"))))
    return wave


def test_two_checkpoints_answer_side_by_side_with_the_same_seed(studio_models):
    studio = studio_for(studio_models, f"compare={studio_models / 'base'}")
    try:
        voices = [{"audio": wav_base64(1.0, n), "name": f"v{n}.wav", "text": "one two"} for n in (1, 2)]
        first = studio.generate({"text": SCRIPT, "speakers": voices})
        again = studio.generate({"text": SCRIPT, "speakers": voices})
        assert [r["label"] for r in first["results"]] == [f"{studio_models.name}/tuned", f"{studio_models.name}/base"]
        tuned = decoded(studio, first["results"][0])
        assert tuned.size and np.array_equal(tuned, decoded(studio, again["results"][0]))  # same seed, same audio
        assert first["results"][0]["duration_s"] == pytest.approx(len(tuned) / studio.codec.output_sample_rate)
    finally:
        studio.close()
    assert not studio.folder.exists()  # the results go with the server


def test_two_adapters_over_one_base_switch_without_merging(studio_models):

    studio = studio_for(
        studio_models, f"checkpoint={studio_models / 'adapter_a'}", f"compare={studio_models / 'adapter_b'}"
    )
    try:
        assert studio.voices[0].model is studio.voices[1].model  # one base in memory
        answer = studio.generate({"text": SPOKEN_BY_BOTH_ADAPTERS})
        audio = [decoded(studio, r) for r in answer["results"]]
        assert not np.array_equal(audio[0], audio[1])
        alone = studio_for(studio_models, f"checkpoint={studio_models / 'adapter_b'}")
        try:
            reference = decoded(alone, alone.generate({"text": SPOKEN_BY_BOTH_ADAPTERS})["results"][0])
        finally:
            alone.close()
        assert len(reference) == len(audio[1])  # the adapter merged into its base, as infer.py loads it
        np.testing.assert_allclose(reference, audio[1], atol=2e-3)
    finally:
        studio.close()


@pytest.mark.parametrize(
    "request_body, message",
    [
        ({"text": "  "}, "the script is empty"),
        ({"text": "x" * 5001}, "at most 5000"),
        ({"text": "[S3]who?"}, "unknown speaker tags"),
        ({"text": SCRIPT, "speakers": [{"audio": wav_base64(0.5)}]}, "both speakers, or for neither"),
        ({"text": SCRIPT, "speakers": [{"audio": "not base64!"}, {"audio": wav_base64(0.5)}]}, "not valid base64"),
        ({"text": SCRIPT, "speakers": [{"audio": wav_base64(3.0)}, {"audio": wav_base64(0.5)}]}, "longer than"),
        ({"text": SCRIPT, "speakers": [{"audio": "AAAA"}, {"audio": wav_base64(0.5)}]}, "unreadable"),
        (["not", "an", "object"], "must be a JSON object"),
    ],
)
def test_bad_input_is_one_message_and_nothing_is_synthesised(studio_models, request_body, message):
    studio = studio_for(studio_models, "max_prompt_seconds=2")
    try:
        answer = studio.generate(request_body)
        assert set(answer) == {"error"} and message in answer["error"], answer
        assert not any(studio.folder.iterdir())
    finally:
        studio.close()


def test_the_server_routes_bound_requests_and_never_serve_other_files(studio_models):
    studio = studio_for(studio_models)
    server = serve(studio, "127.0.0.1", 0, max_request_bytes=1 << 20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"

    def post(body: bytes):
        request = urllib.request.Request(f"{url}/api/generate", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        page = urllib.request.urlopen(url).read().decode()
        assert "MOSS-TTSD studio" in page and f'["{studio_models.name}/tuned"]' in page
        voices = [{"audio": wav_base64(1.0, n), "name": f"v{n}.wav"} for n in (1, 2)]
        status, answer = post(json.dumps({"text": SCRIPT, "speakers": voices}).encode())
        assert status == 200 and answer["results"][0]["audio"].startswith("audio/")
        wav = urllib.request.urlopen(f"{url}/{answer['results'][0]['audio']}").read()
        assert sf.info(io.BytesIO(wav)).frames > 0
        assert post(b"{not json")[0] == 400
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port)
        connection.putrequest("POST", "/api/generate")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(2 << 20))  # refused on its header, before any body is read
        connection.endheaders()
        assert connection.getresponse().status == 413
        for path in ("/audio/../../etc/passwd", "/audio/%2e%2e%2fconfig.json", "/etc/passwd", "/audio/x.wav"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + path)
            assert refused.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
        studio.close()


def test_only_the_page_itself_may_use_the_server(studio_models, caplog, capfd):
    """Another web site (cross-site requests, DNS rebinding) is refused; so are bodies that are not bounded JSON."""
    import logging
    import socket
    from concurrent.futures import ThreadPoolExecutor

    studio = studio_for(studio_models)
    calls = []
    real_generate = studio.generate
    studio.generate = lambda request: calls.append(request) or real_generate(request)
    server = serve(studio, "127.0.0.1", 0, max_request_bytes=1 << 20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port

    def ask(method, path, body=None, **headers):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read()

    good = json.dumps({"text": SCRIPT}).encode()
    try:
        with caplog.at_level(logging.INFO, logger="moss.studio.server"):
            rebinding = {"Host": f"attacker.example:{port}"}
            assert ask("POST", "/api/generate", good, **rebinding)[0] == 403
            assert ask("GET", "/", **rebinding)[0] == 403
            assert ask("GET", "/audio/0123456789abcdef_x.wav", **rebinding)[0] == 403
            foreign = {"Origin": "http://attacker.example", "Sec-Fetch-Site": "cross-site"}
            assert ask("POST", "/api/generate", good, **foreign)[0] == 403
            assert ask("POST", "/api/generate", good, Origin="http://attacker.example")[0] == 403
            assert ask("POST", "/api/generate", good, **{"Sec-Fetch-Site": "same-site"})[0] == 403
            assert ask("POST", "/api/generate", good, **{"Content-Type": "text/plain"})[0] == 415
            assert ask("POST", "/api/generate", good, **{"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
            assert ask("POST", "/api/generate", b"[" * 100_000 + b"]" * 100_000)[0] == 400
            assert ask("POST", "/api/generate", b'{"text": ' + b"9" * 100_000 + b"}")[0] == 400
            assert ask("POST", "/api/generate", b'{"text": NaN}')[0] == 400
            assert calls == []
            # a link from elsewhere may open the page; the page's own requests are served
            assert ask("GET", "/", **{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})[0] == 200
            status, body = ask("POST", "/api/generate", good, Origin=f"http://127.0.0.1:{port}")
            assert status == 200 and json.loads(body)["results"]
            assert ask("POST", "/api/generate", good, Host=f"localhost:{port}")[0] == 200

            # many connections at once are all answered
            with ThreadPoolExecutor(64) as pool:
                assert set(pool.map(lambda _: ask("GET", "/")[0], range(200))) == {200}
            # a client that leaves before the answer is a log line, not a traceback
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.sendall(
                        b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    )
                    sock.sendall(f"Content-Length: {len(good)}\r\n\r\n".encode() + good)
            assert ask("GET", "/")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        studio.close()
    assert "Traceback" not in caplog.text + capfd.readouterr().err
    assert '"GET / HTTP' not in caplog.text  # one line per request: client, method, path, status
    assert '"POST /api/generate" 403' in caplog.text and '"GET /" 200' in caplog.text
