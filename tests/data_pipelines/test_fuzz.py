"""1000 malformed records among valid ones: the run completes, and every line is encoded or reported, once."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipelines.preprocess import preprocess
from tests.conftest import REPO
from tests.data_pipelines.conftest import pipeline_cfg
from tests.data_pipelines.fuzz import make_fuzz_corpus
from tests.data_pipelines.test_preprocess import read_set, run_cli

OVERRIDES = {"limits.max_seconds": 10, "records_per_shard": 100, "record_timeout": 60}


def non_blank_lines(jsonl) -> set[int]:
    return {n for n, line in enumerate(jsonl.read_bytes().split(b"\n")[:-1], start=1) if line.strip()}


def outcome(out) -> tuple[dict, list[dict]]:
    samples = read_set(out)
    report = [json.loads(line) for f in sorted(out.glob("skipped-*.jsonl")) for line in f.read_text().splitlines()]
    return samples, report


def check_accounting(jsonl, encoded_lines, samples, report) -> None:
    lines = non_blank_lines(jsonl)
    encoded = sorted(int(k.rsplit("L", 1)[1]) for k in samples)
    reported = [r["line"] for r in report]
    assert len(set(reported)) == len(reported), "a line was reported twice"
    assert set(encoded) == encoded_lines, "exactly the valid lines are encoded"
    assert set(reported) == lines - encoded_lines, "every other line is reported"
    assert all(r["reason"] and r["stage"] and r["input"] == str(jsonl) for r in report)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    jsonl, encoded = make_fuzz_corpus(folder, bad_lines=1000)
    assert len(non_blank_lines(jsonl) - encoded) >= 1000
    return jsonl, encoded


def test_fuzzed_input_is_encoded_or_reported_exactly_once(tmp_path, codec_files, fuzz):
    jsonl, encoded = fuzz
    cfg = pipeline_cfg(codec_files, [jsonl, jsonl], tmp_path / "out", cpu_workers=2, **OVERRIDES)
    summary = preprocess(cfg)  # the same file listed twice is read once
    samples, report = outcome(tmp_path / "out")
    check_accounting(jsonl, encoded, samples, report)
    assert summary["samples"] == len(encoded) and summary["skipped"] == len(report)
    stages = {r["stage"] for r in report}
    assert {"read", "parse", "validate", "path", "audio"} <= stages
    reasons = " | ".join(r["reason"] for r in report)
    for expected in (
        "invalid JSON",
        "invalid UTF-8",
        "lone surrogate",
        "line too long",
        "wrong field type",
        "not a regular file",
        "symlink loop",
        "audio path too long",
        "sample rate out of range",
        "NaN or infinite",
        "amplitude out of range",
        "longer than the maximum",
    ):
        assert expected in reasons, expected


def cli_args(jsonl, codec_files) -> list[str]:
    """The command-line overrides of a fuzz run (2 loader processes), without output_dir."""
    return [
        f"inputs=[{jsonl}]",
        f"codec.config={codec_files[0]}",
        f"codec.checkpoint={codec_files[1]}",
        "devices=cpu",
        "cpu_workers=2",
        "progress=false",
        *(f"{k}={v}" for k, v in OVERRIDES.items()),
    ]


@pytest.mark.slow
def test_fuzzed_input_under_kill_minus_9_then_rerun(tmp_path, codec_files, fuzz):
    jsonl, encoded = fuzz
    common = cli_args(jsonl, codec_files)
    # The run's own peak-memory line: the test process's children counters also hold every process that
    # earlier tests started (a session's S3 server, training runs), so they cannot measure this one.
    straight = subprocess.run(
        [sys.executable, "-m", "data_pipelines.preprocess", *common, f"output_dir={tmp_path / 'straight'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    peaks = re.search(r"peak memory: (\d+) MB \(this process\), (\d+) MB", straight.stdout)
    assert peaks, straight.stdout[-2000:]
    assert max(map(int, peaks.groups())) < 1500, f"a preprocessing process reached {peaks.group(0)}"
    reference, reference_report = outcome(tmp_path / "straight")
    check_accounting(jsonl, encoded, reference, reference_report)
    out, rng, kills = tmp_path / "killed", random.Random(1), 0
    for _ in range(4):
        target = rng.randint(1, 10)
        proc = run_cli([*common, f"output_dir={out}"], REPO)
        deadline = time.monotonic() + rng.uniform(0, 3)
        while proc.poll() is None and len(list(out.glob("*.tar.json"))) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    assert run_cli([*common, f"output_dir={out}"], REPO).wait() == 0
    resumed, report = outcome(out)
    check_accounting(jsonl, encoded, resumed, report)
    assert sorted(report, key=lambda r: r["line"]) == sorted(reference_report, key=lambda r: r["line"])
    for key, sample in reference.items():
        assert np.array_equal(resumed[key].codes, sample.codes)


def children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(c) for c in open(path).read().split()] if os.path.exists(path) else []


@pytest.mark.slow
def test_killed_loader_workers_cost_a_retry_never_a_hang(tmp_path, codec_files, fuzz):
    jsonl, encoded = fuzz
    args = [*cli_args(jsonl, codec_files), f"output_dir={tmp_path / 'out'}"]
    proc, killed = run_cli(args, REPO), 0
    while proc.poll() is None and killed < 6:
        time.sleep(0.3)
        workers = children(proc.pid)
        if workers:
            os.kill(random.Random(killed).choice(workers), signal.SIGKILL)
            killed += 1
    assert proc.wait(timeout=300) == 0 and killed >= 3
    samples, report = outcome(tmp_path / "out")
    died = {r["line"] for r in report if "loader process died" in r["reason"]}
    check_accounting(jsonl, encoded - died, samples, report)
