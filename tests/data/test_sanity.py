"""The check before training: a template mismatch and mislabelled audio stop the run; good data passes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra.utils import instantiate

from moss.data import sanity
from moss.data.sanity import check_training_data
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.errors import ConfigError
from moss.evaluation.speech_models import Transcript
from tests.conftest import compose_train


def shards_saying(tmp_path, texts: list[str]):
    """A shard set of synthetic audio codes with the given transcripts."""
    samples = [dataclasses.replace(s, text=t) for s, t in zip(generate_samples(len(texts), seed=3), texts, strict=True)]
    write_shards(samples, tmp_path / "said", prefix="said", max_samples=2)
    return tmp_path / "said"


def run_check(tmp_path, overrides: list[str]):
    cfg = compose_train(tmp_path, overrides)
    tokenizer, config = instantiate(cfg.tokenizer), instantiate(cfg.model.config)
    datamodule = instantiate(cfg.data, _partial_=True)(tokenizer=tokenizer, model_config=config)
    check_training_data(cfg, datamodule, tokenizer)


def test_the_built_in_corpus_passes_and_a_normalisation_mismatch_is_named(tmp_path):
    run_check(tmp_path, [])  # the tiny default: texts that v0.5 normalisation leaves as they are
    shards = shards_saying(tmp_path, ["[S1]Hello! How are you?[S2]Fine, thanks!"] * 4)
    with pytest.raises(ConfigError) as refused:
        run_check(tmp_path, [f"data.train_shards={shards}", "data.val_shards=null"])
    message = str(refused.value)
    assert "synthetic-3-0000000" in message and "the script's text or the template" in message
    assert "sanity_check.normalize=v0.5" in message and message.count("  - ") == 4  # every sample named
    normalised = ["+data.normalize={_target_: moss.text.normalize.normalizer, version: v0.5}"]
    run_check(tmp_path, [f"data.train_shards={shards}", "data.val_shards=null", "data.normalize=null", *normalised])
    run_check(tmp_path, [f"data.train_shards={shards}", "data.val_shards=null", "sanity_check.normalize=null"])
    run_check(tmp_path, [f"data.train_shards={shards}", "data.val_shards=null", "sanity_check.samples=0"])


class HeardAs:
    """An ASR stand-in that hears every clip as `text`."""

    text = "hello there"

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, clips, rate):
        return [Transcript(self.text, None) for _ in clips]


def test_audio_that_does_not_say_its_transcript_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr("moss.evaluation.speech_models.Transcriber", HeardAs)
    asr = ["sanity_check.asr_model=stand-in", "codec=tiny", "data.val_shards=null", "sanity_check.normalize=null"]
    said = shards_saying(tmp_path, ["[S1]hello there"] * 3 + ["[S1]something else entirely"])
    run_check(tmp_path, [f"data.train_shards={said}", *asr])  # one odd sample of four: the loader's business
    (tmp_path / "said").rename(tmp_path / "one")
    mislabelled = shards_saying(tmp_path, ["[S1]good night"] * 3 + ["[S1]hello there"])
    with pytest.raises(ConfigError, match=r"3 of 4 samples do not say their transcript .*synthetic-3-0000000: CER"):
        run_check(tmp_path, [f"data.train_shards={mislabelled}", *asr])


def test_the_asr_half_needs_the_codec(tmp_path):
    from moss.config_checks import validate

    with pytest.raises(ConfigError, match=r"sanity_check.asr_model decodes the training codes: codec.config is"):
        validate(compose_train(tmp_path, ["sanity_check.asr_model=openai/whisper-large-v3"]))


def test_first_samples_reads_in_shard_order(tiny_shards):
    from moss.data.dataset import expand_shards

    first = sanity.first_samples(expand_shards(str(tiny_shards)), 10)
    assert [s.key for s in first] == [s.key for s in generate_samples(10, seed=3)]


def test_a_run_the_check_refuses_leaves_its_folder_empty(tmp_path):
    """The check runs before the run records its config or makes its log folder: nothing is left that looks like
    a run (the command line then removes the empty folder Hydra made)."""
    from train import train

    shards = shards_saying(tmp_path, ["[S1]Hello! How are you?[S2]Fine, thanks!"] * 4)
    cfg = compose_train(tmp_path, [f"data.train_shards={shards}", "data.val_shards=null"])
    with pytest.raises(ConfigError, match="the script's text or the template"):
        train(cfg)
    run = Path(cfg.paths.output_dir)
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.rglob("*"))
