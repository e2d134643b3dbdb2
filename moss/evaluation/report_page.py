"""One offline HTML page for "did fine-tuning help or hurt?": base vs tuned tables, the metrics over training, audio.

Pure rendering: the scores (an `eval.json`-shaped report with a `base` and a `tuned` checkpoint), the relative
path of each item's audio, and the quality gate's history (aggregates by training step) go in; one HTML string
comes out, with inline CSS and SVG and no script, so the page opens from disk anywhere. Every text that came
from a user (scripts, transcripts, paths) is escaped.
"""

from __future__ import annotations

from html import escape

from moss.evaluation.scoring import verdict

LABELS = {
    "cer": "CER",
    "wer": "WER",
    "sim_s1": "voice similarity S1",
    "sim_s2": "voice similarity S2",
    "switch_acc": "speaker-switch accuracy",
    "duration_ratio": "duration / expected",
    "hit_limit_rate": "hit the length limit",
}
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f4f4f4;text-align:left}.better{color:#0a7d24;font-weight:600}.worse{color:#b00020;font-weight:600}
.num{text-align:right;font-variant-numeric:tabular-nums}.script{max-width:30em}.small{color:#666;font-size:.9em}
svg{border:1px solid #ddd;margin:.3em .6em .3em 0;background:#fff}figure{display:inline-block;margin:0}
"""


def render_report(report: dict, audio: dict[tuple[str, int], str], history: list[dict] | None = None) -> str:
    """The page for `report` (see the module docstring); `audio[(label, index)]` is a path relative to the page."""
    runs = report["checkpoints"]
    labels = [label for label in ("base", "tuned") if label in runs] or list(runs)
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>MOSS-TTSD fine-tune: base vs tuned</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Did fine-tuning help?</h1>",
        "<p class=small>"
        + " &middot; ".join(
            f"{escape(label)}: <code>{escape(str(runs[label]['checkpoint']))}</code>" for label in labels
        )
        + f" &middot; same scripts, seed {escape(str(report.get('seed')))}</p>",
        _summary_table(runs, labels),
    ]
    if history:
        parts += ["<h2>During training (quality gate)</h2>", _history_plots(history)]
    parts += ["<h2>Per script</h2>", _items_table(runs, labels, audio), "</body></html>"]
    return "\n".join(parts)


def _number(value) -> str:
    return "&ndash;" if value is None else f"{value:.3f}" if isinstance(value, float) else escape(str(value))


def _summary_table(runs: dict, labels: list[str]) -> str:
    rows = ["<table><tr><th>metric</th>" + "".join(f"<th>{escape(label)}</th>" for label in labels) + "</tr>"]
    for metric, label in LABELS.items():
        values = [runs[name]["aggregate"].get(metric) for name in labels]
        if all(v is None for v in values):
            continue
        mark = verdict(metric, values[0], values[-1]) if len(values) == 2 else "same"
        cells = "".join(f"<td class=num>{_number(v)}</td>" for v in values[:-1])
        cells += f"<td class='num {mark}'>{_number(values[-1])}</td>"
        rows.append(f"<tr><td>{escape(label)}</td>{cells}</tr>")
    return "".join(rows) + "</table>"


def _items_table(runs: dict, labels: list[str], audio: dict) -> str:
    items = {label: {item["index"]: item for item in runs[label]["items"]} for label in labels}
    indices = sorted(set().union(*(set(v) for v in items.values())))
    head = "<tr><th>#</th><th>script</th>" + "".join(f"<th>{escape(label)}</th>" for label in labels) + "</tr>"
    rows = ["<table>", head]
    for index in indices:
        script = next((items[label][index].get("script", "") for label in labels if index in items[label]), "")
        cells = "".join(_item_cell(items[label].get(index), audio.get((label, index))) for label in labels)
        rows.append(f"<tr><td class=num>{index}</td><td class=script>{escape(script)}</td>{cells}</tr>")
    return "".join(rows) + "</table>"


def _item_cell(item: dict | None, path: str | None) -> str:
    if item is None:
        return "<td>&ndash;</td>"
    if "error" in item:
        return f"<td class=worse>{escape(item['error'])}</td>"
    player = f"<audio controls preload=none src='{escape(path, quote=True)}'></audio><br>" if path else ""
    if not item.get("duration_s"):  # scored as having said nothing (CER 1), and the page says why
        facts = ["no audio: the model ended the dialogue at once"]
    else:
        facts = [f"{item['duration_s']:.2f} s"]
    facts += [f"{key.upper()} {item[key]:.3f}" for key in ("cer", "wer") if item.get(key) is not None]
    sims = [t["sim_own"] for t in item.get("turns", []) if "sim_own" in t]
    if sims:
        facts.append(f"similarity {sum(sims) / len(sims):.3f}")
    switches = [t["switch_ok"] for t in item.get("turns", []) if "switch_ok" in t]
    if switches:
        facts.append(f"switches {sum(switches)}/{len(switches)}")
    heard = f"<br><span class=small>heard: {escape(item['transcript'])}</span>" if item.get("transcript") else ""
    return f"<td>{player}{escape(', '.join(facts))}{heard}</td>"


def _history_plots(history: list[dict], width: int = 260, height: int = 120) -> str:
    """A small line chart per gate metric over training steps (inline SVG)."""
    figures = []
    for metric, label in LABELS.items():
        points = [(h["step"], h["aggregate"][metric]) for h in history if h["aggregate"].get(metric) is not None]
        if not points:
            continue
        steps, values = [p[0] for p in points], [p[1] for p in points]
        low, high = min(values), max(values)
        span_x, span_y = max(steps) - min(steps) or 1, high - low or 1.0

        def xy(step, value, low=low, span_y=span_y, first=min(steps), span_x=span_x):
            return 30 + (width - 40) * (step - first) / span_x, height - 20 - (height - 35) * (value - low) / span_y

        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in points))
        dots = "".join(f"<circle cx={x:.1f} cy={y:.1f} r=2.5 />" for x, y in (xy(s, v) for s, v in points))
        figures.append(
            f"<figure><svg width={width} height={height} role=img aria-label='{escape(label)}'>"
            f"<text x=5 y=14 font-size=12>{escape(label)}</text>"
            f"<text x=5 y={height - 5} font-size=10>step {min(steps)}&ndash;{max(steps)}; "
            f"{low:.3f}&ndash;{high:.3f}</text>"
            f"<polyline fill=none stroke='#1565c0' stroke-width=2 points='{line}' />"
            f"<g fill='#1565c0'>{dots}</g></svg></figure>"
        )
    return "".join(figures)
