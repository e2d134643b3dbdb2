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


def test_another_web_site_cannot_make_the_studio_generate_and_sigterm_stops_it_fast(studio_models, tmp_path):
    """A page from another origin tries every way a browser lets it reach a local server; none generates. The page
    itself still works, says "Model" for one model, and the server stops within 5 s of SIGTERM."""
    import http.server
    import threading
    from functools import partial

    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "the browser test needs Debian's chromium: apt-get install chromium"
    process, url = start_app([f"checkpoint={studio_models / 'tuned'}", "codec=tiny", "port=0", "max_seconds=2"])
    target = url.rstrip("/") + "/api/generate"
    (tmp_path / "evil.html").write_text(
        "<!doctype html><html><body><form id=f method=POST enctype=text/plain action='" + target + "'>"
        '<input name=\'{"text": "[S1]hi", "x": "\' value=\'"}\'></form><script>\n'
        "const body = JSON.stringify({text: '[S1]pwned'});\n"
        "window.attempts = Promise.allSettled([\n"
        f"  fetch('{target}', {{method: 'POST', mode: 'no-cors', headers: {{'Content-Type': 'text/plain'}}, body}}),\n"
        f"  fetch('{target}', {{method: 'POST', headers: {{'Content-Type': 'application/json'}}, body}}),\n"
        f"  fetch('{target}', {{method: 'POST', mode: 'no-cors', body}}),\n"
        "]).then(() => 'done');\n"
        "</script></body></html>"
    )
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://localhost:{evil.server_port}/evil.html")
            assert page.evaluate("window.attempts") == "done"
            with page.expect_navigation():
                page.evaluate("document.getElementById('f').submit()")  # a form posts across sites as text/plain
            assert "refused" in page.content() or "application/json" in page.content()

            page = browser.new_page()
            page.goto(url)
            assert page.inner_text("p.small").startswith("Model: ") and "Same seed" not in page.inner_text("body")
            page.fill("#text", "[S1]hello there[S2]hi how are you")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=120_000)
            browser.close()
    finally:
        evil.shutdown()
        start = time.monotonic()
        process.terminate()
        code = process.wait(timeout=60)
        stopped_in = time.monotonic() - start
    reader.join(timeout=5)
    posts = [line for line in seen if '"POST /api/generate"' in line]
    assert posts and all(line.rstrip().endswith(("403", "415")) for line in posts[:-1]), posts
    assert posts[-1].rstrip().endswith("200"), posts  # the page's own request, the only one that generated
    assert code == 0 and stopped_in < 5, stopped_in
