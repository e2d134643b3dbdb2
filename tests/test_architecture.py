"""The layers of `moss/` only point down, and plain inference needs neither Lightning nor Hydra.

The contracts are import-linter's (`[tool.importlinter]` in pyproject.toml): every import between the
top-level units of `moss/`, function-level ones included, may only point to a unit listed below it, and every
unit must be listed; inside a package, no modules import each other.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the `moss` package found in `root`, with the project's contract."""
    command = [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, cwd=root, capture_output=True, text=True)


def test_imports_only_point_down():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_the_contract_catches_an_upward_import_inside_a_function_and_an_unlisted_unit(tmp_path):
    shutil.copytree(REPO / "moss", tmp_path / "moss", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "moss" / "model" / "probe.py").write_text("def f():\n    from moss.training import lit_module\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and "moss.model is not allowed to import moss.training" in done.stdout, done.stdout
    (tmp_path / "moss" / "model" / "probe.py").unlink()
    (tmp_path / "moss" / "newunit.py").write_text("")
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and "moss.newunit" in done.stdout + done.stderr, done.stdout + done.stderr
    (tmp_path / "moss" / "newunit.py").unlink()
    # two modules of one package that import each other (through a third here): a weights file reader that
    # reached up to the model loader
    (tmp_path / "moss" / "model" / "folder.py").write_text("def f():\n    from moss.model import checkpoint\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and "no import cycles inside a package BROKEN" in done.stdout, done.stdout


@pytest.mark.slow  # a fresh interpreter importing torch and transformers (9 s)
def test_inference_of_a_model_folder_needs_neither_lightning_nor_hydra(tmp_path, tiny_tokenizer):
    from moss.model import MossTTSD, MossTTSDConfig

    MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    code = (
        "import sys; from moss.inference import Synthesizer; from moss.model.checkpoint import load_model; "
        f"model, tok = load_model({str(tmp_path / 'model')!r}); "
        "loaded = sorted(m for m in ('lightning', 'hydra', 'omegaconf') if m in sys.modules); "
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
