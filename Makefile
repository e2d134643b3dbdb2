.PHONY: install test test-all lint smoke

install:
	pip install "torch==2.14.1" "torchaudio==2.11.0" && pip install -e ".[dev]"

test:        ## the default suite: CPU, about 5 minutes on 2 cores
	python -m pytest

test-all:    ## everything that runs without a GPU, slow tests included (what .ci/run runs)
	python -m pytest -m "not gpu"

lint:
	ruff check . && ruff format --check .

smoke:       ## a few end-to-end training steps of the tiny default
	python train.py debug=fast_dev_run name=smoke
