"""A generator of malformed preprocessing input: broken JSON, wrong types, hostile paths, broken audio.

`make_fuzz_corpus` writes audio files (good ones at odd rates too) and one JSONL mixing valid lines with
malformed ones, and returns which lines must be encoded: every other non-blank line must be reported.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.data_pipelines.conftest import tone

TAGGED = "[S1]hello there[S2]hi again"


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1, claimed_frames: int | None = None) -> bytes:
    """A 16-bit PCM WAV whose header may lie about its rate and length."""
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    size = len(data) if claimed_frames is None else claimed_frames * 2 * channels
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * 2 * channels, 2 * channels, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + (struct.pack("<I", min(size, 2**32 - 1)) + data)
    )


def write_audio(folder: Path) -> tuple[list[str], list[str]]:
    """(usable audio files, unusable ones), relative to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    good, bad = [], []

    def put(name: str, usable: bool, write) -> None:
        write(folder / name)
        (good if usable else bad).append(name)

    put("ok.wav", True, lambda p: sf.write(p, tone(1.2), 16000))
    put("ok.flac", True, lambda p: sf.write(p, tone(1.4, rate=44100), 44100))
    put("ok.ogg", True, lambda p: sf.write(p, tone(1.3, rate=48000), 48000, format="OGG", subtype="VORBIS"))
    put("ok8k.wav", True, lambda p: sf.write(p, tone(1.2, rate=8000), 8000))
    put("ok96k.wav", True, lambda p: sf.write(p, tone(1.1, rate=96000), 96000))
    put("ok7919.wav", True, lambda p: sf.write(p, tone(1.2, rate=7919), 7919))
    put("ok44101.wav", True, lambda p: sf.write(p, tone(1.2, rate=44101), 44101))
    six = np.stack([tone(1.2, seed=c) for c in range(6)], axis=1)
    put("ok6ch.wav", True, lambda p: sf.write(p, six, 16000))
    put("empty.wav", False, lambda p: p.write_bytes(b""))
    rng = random.Random(0)
    for ext in ("wav", "flac", "ogg", "mp3"):
        put(f"garbage.{ext}", False, lambda p: p.write_bytes(bytes(rng.randrange(256) for _ in range(3000))))
    for ext, kw in (("wav", {}), ("flac", {}), ("ogg", {"format": "OGG", "subtype": "VORBIS"})):
        full = folder / f"full.{ext}"
        sf.write(full, tone(2.0), 16000, **kw)
        data = full.read_bytes()
        full.unlink()
        put(f"header-only.{ext}", False, lambda p, data=data: p.write_bytes(data[:40]))
    nan = tone(1.2)
    nan[100] = np.nan
    put("nan.wav", False, lambda p: sf.write(p, nan, 16000, subtype="FLOAT"))
    inf = tone(1.2)
    inf[5] = np.inf
    put("inf.wav", False, lambda p: sf.write(p, inf, 16000, subtype="FLOAT"))
    put("loud.wav", False, lambda p: sf.write(p, tone(1.2) * 1e30, 16000, subtype="FLOAT"))
    put("silent.wav", False, lambda p: sf.write(p, np.zeros(20000, np.float32), 16000))
    put("one-sample.wav", False, lambda p: sf.write(p, np.ones(1, np.float32) * 0.5, 16000))
    put("rate1.wav", False, lambda p: p.write_bytes(wav_bytes(tone(2.0), 1)))
    put("rate1M.wav", False, lambda p: p.write_bytes(wav_bytes(tone(2.0), 1_000_000)))
    # A header claiming 10^9 frames over 1 s of data: a file cut short, refused (its transcript is of the whole).
    put("liar.wav", False, lambda p: p.write_bytes(wav_bytes(tone(1.0), 16000, claimed_frames=10**9)))
    put("long.wav", False, lambda p: sf.write(p, tone(12.0), 16000))
    put("many-channels.wav", False, lambda p: p.write_bytes(wav_bytes(np.tile(tone(0.05), 40), 16000, channels=40)))
    (folder / "a-directory.wav").mkdir(exist_ok=True)
    bad.append("a-directory.wav")
    for name, target in (("loop-a.wav", "loop-b.wav"), ("loop-b.wav", "loop-a.wav"), ("dangling.wav", "nowhere")):
        if not (folder / name).is_symlink():
            os.symlink(target, folder / name)
        bad.append(name)
    if not (folder / "fifo.wav").exists():
        os.mkfifo(folder / "fifo.wav")
    bad.append("fifo.wav")
    return good, bad


def make_fuzz_corpus(folder: Path, bad_lines: int = 1000, seed: int = 0) -> tuple[Path, set[int]]:
    """Write `folder/fuzz.jsonl` with about `bad_lines` malformed lines among valid ones.

    Returns the JSONL and the line numbers that must be encoded; every other non-blank line must be reported.
    """
    rng = random.Random(seed)
    good_audio, bad_audio = write_audio(folder / "audio")
    good_audio = [f"audio/{n}" for n in good_audio]
    bad_audio = [f"audio/{n}" for n in bad_audio] + [
        "/dev/zero",
        "/dev/null",
        "audio/missing.wav",
        "audio/" + "x" * 300 + ".wav",
        "audio/" + "d/" * 2100 + "a.wav",
        "audio/nul\0.wav",
        "",
        "   ",
        str(folder / "audio"),
    ]

    def dialogue(path=None, text=TAGGED):
        return {"file_path": rng.choice(good_audio) if path is None else path, "full_transcript": text}

    def cloning(path=None, ref=None):
        return {
            "reference_audio": rng.choice(good_audio) if ref is None else ref,
            "reference_text": "[S1]a reference",
            "audio": rng.choice(good_audio) if path is None else path,
            "text": "[S2]the target",
        }

    wrong_values = [None, 0, 123, -1.5, True, [], ["x"], {}, {"a": 1}, 10**30]
    valid_json = [json.dumps(dialogue()) for _ in range(5)] + [json.dumps(cloning()) for _ in range(5)]

    def malformed() -> str | bytes:
        kind = rng.randrange(14)
        if kind == 0:  # broken or partial JSON
            line = rng.choice(valid_json)
            return line[: rng.randrange(1, len(line) - 1)]
        if kind == 1:  # not an object, or hostile JSON
            return rng.choice(
                [
                    "null",
                    "42",
                    '"a string"',
                    "[1, 2]",
                    "{",
                    "}{",
                    "{'single': 'quotes'}",
                    '{"a": NaN}',
                    "[" * 100_000 + "]" * 100_000,
                    '{"file_path": "audio/ok.wav", "full_transcript": "[S1]x", "n": ' + "9" * 5000 + "}",
                    "\x00\x01\x02",
                    "\ufeff" + json.dumps(dialogue()),
                ]
            )
        if kind == 2:  # a wrong type for one field
            item = rng.choice([dialogue(), cloning()])
            item[rng.choice(sorted(item))] = rng.choice(wrong_values)
            return json.dumps(item)
        if kind == 3:  # missing or renamed keys
            item = rng.choice([dialogue(), cloning()])
            key = rng.choice(sorted(item))
            value = item.pop(key)
            if rng.random() < 0.5:
                item[key.upper()] = value
            return json.dumps(item)
        if kind == 4:  # empty, untagged, garbage or oversized text
            huge = "[S1]" + "word " * 300_000
            text = rng.choice(["", "   ", "no tags", "[S3]wrong speaker", "\x00\x07", huge, "[S1]" * 9000])
            return json.dumps(dialogue(text=text))
        if kind == 5:  # a lone surrogate
            return '{"file_path": "audio/ok.wav", "full_transcript": "[S1]bad \\ud800 text"}'
        if kind == 6:  # bad audio for the dialogue format
            return json.dumps(dialogue(path=rng.choice(bad_audio)))
        if kind == 7:  # bad target or reference audio for the cloning format
            return json.dumps(
                cloning(path=rng.choice(bad_audio)) if rng.random() < 0.5 else cloning(ref=rng.choice(bad_audio))
            )
        if kind == 8:  # base_path of the wrong type or pointing nowhere
            return json.dumps(dialogue() | {"base_path": rng.choice([123, [], {"x": 1}, "/nonexistent/dir", True])})
        if kind == 9:  # a transcript that cannot belong to its audio
            return json.dumps(dialogue(text="[S1]" + "many words " * 300))
        if kind == 10:  # invalid UTF-8 inside a string
            return json.dumps(dialogue(text="[S1]@@")).encode().replace(b"@@", b"\xff\xfe")
        if kind == 11:  # a line with a carriage return or U+2028 inside: still one line, still broken
            return '{"file_path": "audio/ok.wav",\r "full_transcript": 5}'
        if kind == 12:
            return json.dumps(dialogue()) + " trailing"
        return json.dumps(rng.choice([{}, {"something": "else"}, {"audio": None}, {"file_path": []}]))

    lines: list[str | bytes] = []
    encoded: set[int] = set()
    remaining = bad_lines
    while remaining > 0:
        if rng.random() < 0.12:
            if rng.random() < 0.1:  # U+2028 and a carriage return inside a valid line: one record
                lines.append(json.dumps(dialogue(text="[S1]hello\u2028there[S2]hi\r again"), ensure_ascii=False))
            else:
                lines.append(json.dumps(rng.choice([dialogue, cloning])()))
            encoded.add(len(lines))
        else:
            lines.append(malformed())
            remaining -= 1
        if rng.random() < 0.03:
            lines.append("   ")  # blank lines are not records
    lines.append(lines[min(encoded) - 1])  # a duplicated record: a distinct line, so its own key
    encoded.add(len(lines))
    path = folder / "fuzz.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return path, encoded
