"""Shards are untrusted: generated hostile tars never stall, bloat or crash a reader, and lose no good sample.

Each case is a shard made by one of the generators below from a real shard (written by the production writer):
headers that claim huge members, compressed files, truncations, flipped bytes, duplicate keys, odd members.
The bounded reader must finish each one quickly, in little memory, with every failure reported; the stream
around it must still deliver every sample of the good shards exactly once.
"""

import bz2
import gzip
import io
import json
import lzma
import random
import tarfile
import time
import tracemalloc

import pytest
from torch.utils.data import DataLoader

from moss.data import tar_reader
from moss.data.dataset import ShardStream, expand_shards, manifest_entries
from moss.data.examples import ExampleBuilder
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.text import PromptBuilder

CASES = 160
DEADLINE_S = 5.0  # a hostile shard must end well within this
MEMORY_CAP = 16 << 20  # bytes allocated while reading one hostile shard of a few kB


@pytest.fixture(scope="module")
def good_tar(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("good")
    write_shards(generate_samples(6, seed=11), folder, prefix="h", max_samples=100)
    return (folder / "h-000000.tar").read_bytes()


def _member(tar: tarfile.TarFile, name: str, data: bytes, **pax) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if pax:
        info.pax_headers = {k: str(v) for k, v in pax.items()}
    tar.addfile(info, io.BytesIO(data))


def _tar(build, fmt=tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        build(tar)
    return out.getvalue()


def _huge_ustar_size(good: bytes) -> bytes:
    header = bytearray(good[:512])
    header[124:136] = b"77777777777\0"  # 8 GiB
    header[148:156] = b"        "
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header) + good[512:]


def hostile(case: int, good: bytes) -> tuple[str, bytes, bool]:
    """(kind, shard bytes, whether reading it must report an error) for generated case `case`."""
    rng = random.Random(case)
    kind = case % 16
    if kind == 0:  # a pax header claiming a 2^40-byte member over 10 bytes of data
        return "pax-size", _tar(lambda t: _member(t, "k.json", b"{}" * 5, size=2**40 + rng.randrange(1000))), True
    if kind == 1:
        return "ustar-size", _huge_ustar_size(good), True
    if kind == 2:
        return "gzip", gzip.compress(good * rng.randrange(1, 4)), True
    if kind == 3:
        return "bzip2", bz2.compress(good), True
    if kind == 4:
        return "xz", lzma.compress(good), True
    if kind == 5:
        return "zstd-magic", b"\x28\xb5\x2f\xfd" + bytes(rng.randrange(256) for _ in range(600)), True
    if kind in (6, 7):  # cut at a random point before the last member's data ends (not at a block boundary)
        with tarfile.open(fileobj=io.BytesIO(good)) as tar:
            last = tar.getmembers()[-1]
        cut = rng.randrange(1, last.offset_data + last.size)
        cut += 1 if cut % 512 == 0 else 0
        return "truncated", good[:cut], True
    if kind in (8, 9):  # bytes flipped anywhere: a corrupt header is reported, corrupt data fails the sample
        data = bytearray(good)
        for _ in range(rng.randrange(1, 12)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return "flipped", bytes(data), False
    if kind == 10:
        return "random", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20000))), True
    if kind == 11:
        return "empty", b"" if rng.random() < 0.5 else bytes(1024), False
    if kind == 12:  # a pax header whose own size is huge
        header = bytearray(_tar(lambda t: _member(t, "p" * 120 + ".json", b"{}"))[:512])
        header[124:136] = b"77777777777\0"
        header[148:156] = b"        "
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        return "pax-header-size", bytes(header) + bytes(2048), True
    if kind == 13:  # odd but legal members around real ones: directories, links, long names, no extension

        def build(t):
            d = tarfile.TarInfo("dir/")
            d.type = tarfile.DIRTYPE
            t.addfile(d)
            link = tarfile.TarInfo("link.json")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(link)
            _member(t, "noextension", b"x")
            _member(t, "d" * rng.randrange(100, 300) + ".json", b"{}")

        fmt = tarfile.GNU_FORMAT if rng.random() < 0.5 else tarfile.PAX_FORMAT
        return "odd-members", _tar(build, fmt), False
    if kind == 14:  # a member over the reader's cap (its header read, its data never)
        return "over-cap", _tar(lambda t: _member(t, "big.codes.npy", bytes(200_000))), True
    return "headers-only", good[:512] + bytes(rng.randrange(0, 10)), True


@pytest.mark.parametrize("case", range(CASES))
def test_a_hostile_shard_ends_quickly_in_bounded_memory_and_is_reported(tmp_path, good_tar, case):
    kind, data, must_fail = hostile(case, good_tar)
    path = tmp_path / "hostile.tar"
    path.write_bytes(data)
    errors = []
    tracemalloc.start()
    started = time.monotonic()
    samples = list(tar_reader.samples(str(path), handler=lambda e: errors.append(e) or True, max_member_bytes=100_000))
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < DEADLINE_S, kind
    assert peak < MEMORY_CAP + 4 * len(data), (kind, peak)
    if must_fail:
        assert errors and all(isinstance(e, tar_reader.ShardError) for e in errors), kind
        assert str(path) in str(errors[0])
    assert all(isinstance(s["__key__"], str) for s in samples)


def test_compressed_shards_are_refused_by_name():
    for blob, kind in ((gzip.compress(b"x" * 100), "gzip"), (bz2.compress(b"x"), "bzip2"), (lzma.compress(b"x"), "xz")):
        with pytest.raises(tar_reader.ShardError, match=f"a {kind}-compressed file"):
            list(tar_reader.members(io.BytesIO(blob), "s.tar"))


def test_the_reader_groups_samples_as_webdataset_does(tmp_path, good_tar):
    import webdataset as wds

    path = tmp_path / "good.tar"
    path.write_bytes(good_tar)
    ours = list(tar_reader.samples(str(path)))
    theirs = list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in ours] == [
        {k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in theirs
    ]
    # Only the fields asked for are read; the others are skipped unread.
    light = list(tar_reader.samples(str(path), fields=lambda ext: ext == "json"))
    assert [sorted(k for k in s if not k.startswith("__")) for s in light] == [["json"]] * len(ours)


@pytest.fixture
def builder(tiny_tokenizer):
    return ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368, max_rows=4096)


def stream_keys(stream) -> list[str]:
    return [k for batch in DataLoader(stream, batch_size=None, num_workers=0) for k in batch.stats.keys]


@pytest.mark.parametrize("case", [0, 1, 2, 6, 8, 9, 10, 12, 13, 15])
def test_the_stream_keeps_every_good_sample_beside_a_hostile_shard(tmp_path, good_tar, builder, case):
    good = list(generate_samples(12, seed=5))
    write_shards(good, tmp_path, prefix="a", max_samples=6)
    kind, data, must_fail = hostile(case, good_tar)
    (tmp_path / "b-000000.tar").write_bytes(data)
    stream = ShardStream(expand_shards(str(tmp_path / "*.tar")), builder, repeat=False, shuffle=False)
    keys = stream_keys(stream)
    assert sorted(k for k in keys if k.startswith(good[0].key.rsplit("-", 1)[0])) == sorted(s.key for s in good)
    if must_fail:
        assert stream.skipped["unreadable shard"] == 1, kind


def test_duplicate_keys_are_used_once_and_reported_also_after_a_resume(tmp_path, builder):
    samples = list(generate_samples(10, seed=7))
    write_shards(samples[:6], tmp_path / "a", prefix="a", max_samples=6)
    write_shards(samples[3:] + samples[:2], tmp_path / "b", prefix="b", max_samples=20)  # 3 + 2 duplicates
    urls = expand_shards([str(tmp_path / "a"), str(tmp_path / "b")])
    stream = ShardStream(urls, builder, repeat=False, shuffle=False)
    keys = stream_keys(stream)
    assert sorted(keys) == sorted(s.key for s in samples) and len(keys) == 10
    assert stream.skipped["duplicate key"] == 5
    # Stopped inside the second shard and resumed: the first shard's keys are known again (from its headers),
    # so the resumed stream skips the same duplicates and continues exactly.
    first = ShardStream(urls, builder, repeat=False, shuffle=False)
    iterator = iter(first)
    before = [k for _ in range(7) for k in next(iterator).stats.keys]
    resumed = ShardStream(urls, builder, repeat=False, shuffle=False)
    resumed.load_state_dict(first.state_dict())
    after = [k for batch in resumed for k in batch.stats.keys]
    assert before + after == keys


@pytest.mark.parametrize(
    "claim",
    [
        {"samples": 100_000, "frames": 100},
        {"samples": -3, "frames": 10},
        {"samples": True, "frames": 10},
        {"samples": "2", "frames": 10},
        {"samples": 2, "frames": 10**12},
        {"samples": 2, "frames": 10, "sample_frames": [1, 2, 3]},
        {"samples": 2, "frames": 10, "sample_frames": [-5, 15]},
    ],
)
def test_a_lying_manifest_is_reported_and_counted_from_the_tar(tmp_path, caplog, claim):
    samples = list(generate_samples(4, seed=2))
    write_shards(samples, tmp_path, prefix="m", max_samples=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    truth = {e["shard"]: e for e in manifest["shards"]}
    manifest["shards"][0] = {"shard": manifest["shards"][0]["shard"], **claim}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    entries = {e["shard"]: e for e in manifest_entries(expand_shards(str(tmp_path)))}
    for name, entry in truth.items():
        assert entries[name]["samples"] == entry["samples"] and entries[name]["frames"] == entry["frames"]
    assert "counting its samples from the tar" in caplog.text
