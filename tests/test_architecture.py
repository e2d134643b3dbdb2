"""The layers of `moss/` only point down, and plain inference needs neither Lightning nor Hydra.

Every import (module level or inside a function) between the top-level units of `moss/` is read from the
source; a unit may import only units listed before it in `LAYERS`, which also rules out cycles.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# Bottom to top: the model knows nothing of data, data nothing of training, training nothing of the CLI.
LAYERS = (
    "moss.errors",
    "moss.worker_signals",
    "moss.outputs",
    "moss.distributed",
    "moss.model",
    "moss.text",
    "moss.audio",
    "moss.codec",
    "moss.data",
    "moss.streaming",
    "moss.sampling",
    "moss.generation",
    "moss.inference",
    "moss.training",
    "moss.config_checks",
    "moss.cli",
)


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "moss" or len(parts) < 2 or parts[1] == "__init__":
        return None  # outside moss/, or the package root
    return ".".join(parts[:2])


def imports() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> files where it happens."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted((REPO / "moss").rglob("*.py")):
        relative = path.relative_to(REPO).with_suffix("")
        source = unit_of(".".join(relative.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                target = unit_of(name)
                if source and target and target != source:
                    found.setdefault((source, target), []).append(str(path.relative_to(REPO)))
    return found


def test_every_unit_has_a_layer():
    units = {unit_of(".".join(p.relative_to(REPO).with_suffix("").parts)) for p in (REPO / "moss").rglob("*.py")}
    assert units - {None} <= set(LAYERS), f"add {sorted(units - {None} - set(LAYERS))} to LAYERS"


def test_imports_only_point_down():
    upward = {
        f"{a} imports {b} ({', '.join(sorted(set(files)))})": None
        for (a, b), files in imports().items()
        if LAYERS.index(b) > LAYERS.index(a)
    }
    assert not upward, list(upward)


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
