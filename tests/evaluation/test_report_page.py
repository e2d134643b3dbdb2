"""The base-vs-tuned page: every user text escaped, verdicts in each metric's direction, audio and plots in place."""

from __future__ import annotations

from html.parser import HTMLParser

from moss.evaluation.report_page import render_report
from moss.evaluation.scoring import comparison, verdict


def run(label: str, cer: float, sim: float, ratio: float) -> dict:
    item = {
        "index": 0,
        "script": "[S1]<script>alert(1)</script>[S2]ok",
        "duration_s": 1.5,
        "cer": cer,
        "transcript": "heard <b>this</b>",
        "turns": [
            {"speaker": 1, "sim_own": sim, "switch_ok": True},
            {"speaker": 2, "sim_own": sim, "switch_ok": False},
        ],
    }
    failed = {"index": 1, "script": "[S1]x", "error": "prompt audio <missing>"}
    aggregate = {"cer": cer, "sim_s1": sim, "duration_ratio": ratio, "switch_acc": 0.5}
    return {"checkpoint": f"/runs/{label}'s", "aggregate": aggregate, "items": [item, failed]}


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.audio = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "audio":
            self.audio.append(dict(attrs)["src"])


def test_verdicts_follow_each_metrics_direction():
    assert verdict("cer", 0.2, 0.1) == "better" and verdict("cer", 0.1, 0.2) == "worse"
    assert verdict("sim_s1", 0.5, 0.6) == "better" and verdict("switch_acc", 0.9, 0.8) == "worse"
    assert verdict("duration_ratio", 1.3, 0.9) == "better" and verdict("duration_ratio", 1.05, 1.2) == "worse"
    assert verdict("cer", None, 0.1) == "same" and verdict("wer", 0.3, 0.3) == "same"
    both = comparison({"base": run("base", 0.4, 0.5, 1.3), "tuned": run("tuned", 0.2, 0.7, 1.1)})
    assert both["cer"] == {"base": 0.4, "tuned": 0.2, "delta": -0.2, "verdict": "better"}
    assert both["switch_acc"]["verdict"] == "same" and "wer" not in both


def test_the_page_escapes_user_text_and_places_audio_plots_and_verdicts():
    report = {"seed": 7, "checkpoints": {"base": run("base", 0.4, 0.5, 1.3), "tuned": run("tuned", 0.2, 0.3, 1.1)}}
    audio = {("base", 0): "eval_audio/base_0000.wav", ("tuned", 0): "eval_audio/tuned_0000.wav"}
    history = [{"step": s, "aggregate": {"cer": c, "sim_s1": None}} for s, c in ((100, 0.5), (200, 0.3), (300, 0.2))]
    page = render_report(report, audio, history)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "heard &lt;b&gt;this&lt;/b&gt;" in page and "prompt audio &lt;missing&gt;" in page
    assert "/runs/tuned&#x27;s" in page
    parsed = Tags()
    parsed.feed(page)
    assert parsed.audio == ["eval_audio/base_0000.wav", "eval_audio/tuned_0000.wav"]
    assert "script" not in parsed.tags  # nothing executable: the page opens from disk anywhere
    assert parsed.tags.count("polyline") == 1 and parsed.tags.count("circle") == 3  # CER over 3 steps; S1 unmeasured
    assert "<td class='num better'>0.200</td>" in page  # CER fell
    assert "<td class='num worse'>0.300</td>" in page  # similarity fell
    assert "similarity 0.300, switches 1/2" in page


def test_a_model_that_generated_no_audio_says_so_instead_of_a_zero_duration():
    silent = run("tuned", 1.0, 0.0, 0.0)
    silent["items"][0]["duration_s"] = 0.0
    page = render_report({"seed": 7, "checkpoints": {"base": run("base", 0.4, 0.5, 1.3), "tuned": silent}}, {}, [])
    assert "0.00 s" not in page and "no audio: the model ended the dialogue at once" in page
    assert "1.50 s" in page
