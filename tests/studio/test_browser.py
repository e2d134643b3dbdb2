"""app.py in a real headless browser (Debian's chromium driven by playwright): type, generate, listen, see errors."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a server process and a browser (about 15 s)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def start_app(args: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "app.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline, seen = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if line.startswith("studio: http://"):
            return process, line.split()[1]
    process.kill()
    raise AssertionError("app.py did not start:\n" + "".join(seen[-30:]))


def test_type_generate_listen_and_see_the_errors_on_the_page(studio_models, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "the browser test needs Debian's chromium: apt-get install chromium"
    for n in (1, 2):
        voice = 0.1 * np.random.default_rng(n).standard_normal(16000).astype(np.float32)
        sf.write(tmp_path / f"voice{n}.wav", voice, 16000)
    args = [f"checkpoint={studio_models / 'tuned'}", f"compare={studio_models / 'base'}", "codec=tiny", "port=0"]
    process, url = start_app([*args, "max_seconds=3", "progress=false"])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url)
            assert page.inner_text("#labels") == f"{studio_models.name}/tuned vs {studio_models.name}/base"
            page.fill("#text", "[S1]hello there[S2]hi how are you[S1]fine thanks")
            page.set_input_files("#audio1", str(tmp_path / "voice1.wav"))
            page.set_input_files("#audio2", str(tmp_path / "voice2.wav"))
            page.fill("#prompt1", "one two")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=120_000)
            boxes = page.query_selector_all(".voice")
            assert [b.get_attribute("data-label") for b in boxes] == [
                f"{studio_models.name}/{n}" for n in ("tuned", "base")
            ]
            source = page.eval_on_selector(".voice[data-label$='/tuned'] audio", "audio => audio.src")
            wav = page.request.get(source).body()  # what the player plays, fetched as the page does
            assert sf.info(io.BytesIO(wav)).frames > 0
            link = page.get_attribute(".voice[data-label$='/tuned'] a", "download")
            assert link == f"{studio_models.name}/tuned.wav"
            for box in boxes:  # each model shows its audio or says why it has none
                assert box.query_selector("audio") or "generated no audio" in box.inner_text()

            # Bad input: the page shows the server's message and no stale results.
            page.fill("#text", "   ")
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "the script is empty" in page.inner_text("#error")
            assert page.query_selector_all(".voice") == []
            page.fill("#text", "[S1]hi[S2]hello")
            page.set_input_files("#audio2", [])  # one speaker's voice only
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.includes('neither')")
            browser.close()
    finally:
        process.terminate()  # SIGTERM: the server stops cleanly and removes its results
        assert process.wait(timeout=30) == 0
