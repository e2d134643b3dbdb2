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
