#!/usr/bin/env bash
# Download the wheels the GPU test machine's image lacks into .whl/ (git-ignored), for benchmarks/device_check.sh.
# That image (Python 3.12, torch 2.11 cu130, transformers 5.17, lightning 2.6.6, peft) reaches no package index;
# these travel beside the checkout (about 14 MB, 11 of them silero-vad's, for data_pipelines.transcribe; scipy, which
# its diarisation also needs, is not fetched). Run here, on a machine with a package index:
#   bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
# Pinned to the versions the suite runs with here; --no-deps: each missing dependency is named itself.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.3.1 hydra-core==1.3.8 hydra-zen==0.17.2 torchdata==0.11.0 \
    soundfile==0.14.0 cffi==2.0.0 pycparser==3.0 liger-kernel==0.8.5 soxr==1.1.0 jiwer==4.0.0 rapidfuzz==3.14.6 \
    click==8.5.1 silero-vad==6.2.3
# antlr4-python3-runtime 4.9.3 (what hydra-core 1.3 needs) is published as a source archive only: build its wheel.
python3 -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl && du -sh .whl
