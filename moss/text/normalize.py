"""Dialogue-script normalisation of the original MOSS-TTSD releases (v0.5-final and v0.7 rules).

Both versions: `[1]`/`[2]` become `[S1]`/`[S2]`; newlines become spaces; the text is split before every
`[S<n>]` tag and each segment is cleaned: decorative brackets and quotes deleted, laughter replaced, `——` and
`……` turned into commas, some punctuation turned into commas, the segment stripped, its final comma made a
full stop and every earlier `。` a comma. Consecutive segments of the same speaker are merged and curly
single quotes become `'`.

They differ in three places: v0.5 drops the brackets of non-speaker `[...]` tags, writes laughter as
`(笑)`/`(laughs)` and turns every `！？!?` into a comma; v0.7 keeps bracketed tags, writes `[笑]`/`[laugh]`
and keeps `！？!?`.
"""

from __future__ import annotations

import functools
import re

VERSIONS = ("v0.5", "v0.7")
_NUMBERED_TAG = re.compile(r"\[(\d+)\]")
_NON_SPEAKER_BRACKETS = re.compile(r"\[(?!S\d+\])([^\]]*)\]")
_SPLIT = re.compile(r"(?=\[S\d+\])")
_TAG = re.compile(r"^\[S\d+\]")
_DELETE = str.maketrans("", "", '【】《》（）『』「」"-_“”～~')
_ZH_LAUGH = re.compile(r"哈{2,}")
_EN_LAUGH = re.compile(r"\bha(?:\s*ha)+\b", re.IGNORECASE)  # any run of spaces between, as the original
_COMMAS = {
    "v0.5": (str.maketrans({c: "，" for c in "！；：、？"}), str.maketrans({c: "," for c in "!;:?"})),
    "v0.7": (str.maketrans({c: "，" for c in "；：、"}), str.maketrans({c: "," for c in ";:"})),
}
_LAUGHTER = {"v0.5": ("(笑)", "(laughs)"), "v0.7": ("[笑]", "[laugh]")}


def _clean_segment(text: str, version: str) -> str:
    zh_laugh, en_laugh = _LAUGHTER[version]
    text = text.translate(_DELETE)
    text = _EN_LAUGH.sub(en_laugh, _ZH_LAUGH.sub(zh_laugh, text))
    text = text.replace("——", "，").replace("……", "，")
    wide, narrow = _COMMAS[version]
    text = text.translate(wide).translate(narrow).strip()
    if len(text) > 1:
        last = {"，": "。", ",": "."}.get(text[-1], text[-1])
        text = text[:-1].replace("。", "，") + last
    return text


def normalize_text(text: str, version: str = "v0.5") -> str:
    """Normalise a dialogue script with `[S1]`/`[S2]` tags as the original release `version` does.

    Raises:
        ValueError: unknown version.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown normalisation version {version!r}; choose one of {VERSIONS}")
    text = _NUMBERED_TAG.sub(r"[S\1]", text)
    if version == "v0.5":
        text = _NON_SPEAKER_BRACKETS.sub(r"\1", text)
    text = text.replace("\n", " ")
    merged: list[list[str]] = []
    for segment in _SPLIT.split(text):
        segment = segment.strip()
        match = _TAG.match(segment)
        tag = match.group(0) if match else ""
        content = _clean_segment(segment[len(tag) :], version)
        if merged and tag and merged[-1][0] == tag:
            merged[-1][1] += content
        else:
            merged.append([tag, content])
    return "".join(tag + content for tag, content in merged).replace("‘", "'").replace("’", "'")


def normalizer(version: str | None):
    """`str -> str` normaliser for `version` (None: no normalisation), for data configs."""
    if version is None:
        return None
    if version not in VERSIONS:
        raise ValueError(f"unknown normalisation version {version!r}; choose one of {VERSIONS} or null")
    return functools.partial(normalize_text, version=version)  # picklable, for loader workers
