"""The one resume journal of preprocessing and transcription: what differs is named, done units survive a rerun."""

import json

from data_pipelines.journal import PLAN, Journal, file_digest


def test_a_new_folder_records_its_split_and_a_rerun_keeps_it(tmp_path):
    made = {"inputs": {"/d/a.jsonl": "1"}, "limits": {"max_seconds": 30}}
    first = Journal(tmp_path, made)
    assert first.saved is None and first.changes() == []
    assert first.begin({"num_slots": 4}) == {"num_slots": 4}
    again = Journal(tmp_path, json.loads(json.dumps(made)))
    assert again.changes() == [] and again.begin({"num_slots": 2}) == {"num_slots": 4}  # fixed by the first run


def test_what_differs_is_named_in_words(tmp_path):
    Journal(tmp_path, {"inputs": {"/d/a.jsonl": "1", "/d/b.jsonl": "2"}, "codec": {"name": "x"}}).begin()
    assert Journal(tmp_path, {"inputs": {"/d/a.jsonl": "9", "/d/c.jsonl": "3"}, "codec": {"name": "y"}}).changes() == [
        "a.jsonl changed",
        "c.jsonl added",
        "b.jsonl removed",
        "codec",
    ]
    assert Journal(tmp_path, {"inputs": {"/d/b.jsonl": "2", "/d/a.jsonl": "1"}, "codec": {"name": "x"}}).changes() == [
        "inputs reordered"  # the records' split into shards follows the order
    ]
    assert Journal(tmp_path, {"inputs": {"/d/a.jsonl": "1", "/d/b.jsonl": "2"}}).changes() == ["codec"]


def test_a_record_cut_short_is_not_done_and_a_finished_one_is(tmp_path):
    journal = Journal(tmp_path, {})
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "r1.json").write_text('{"records": [')  # no atomic write would leave this; a hand edit
    assert journal.done("parts/r1.json") is None and journal.done("parts/r2.json") is None
    journal.finish("parts/r2.json", {"records": ["é"]})
    assert journal.done("parts/r2.json") == {"records": ["é"]}
    assert not [p for p in (tmp_path / "parts").iterdir() if "tmp" in p.name]


def test_the_plan_of_earlier_versions_is_read(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"x": 1}\n')
    sources = {"inputs": {str(jsonl): file_digest(jsonl)}, "codec": {"tiny": True}, "limits": {}, "base_path": None}
    earlier = {"inputs": [str(jsonl)], "records_per_shard": 8, "num_slots": 3, "sources": sources}
    (tmp_path / PLAN).write_text(json.dumps(earlier))
    now = {**sources, "records_per_shard": 8}
    assert Journal(tmp_path, now).changes() == [] and Journal(tmp_path, now).begin({"num_slots": 1}) == {"num_slots": 3}
    assert Journal(tmp_path, {**now, "records_per_shard": 4}).changes() == ["records_per_shard"]
