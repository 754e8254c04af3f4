"""Every Python name the README and docs/ show (``sparseseg.x.y`` in the text, ``from sparseseg.x import y`` in code
blocks) resolves in this package, so the documented paths cannot drift from the tree."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOTTED = re.compile(r"\bsparseseg(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
FROM_IMPORT = re.compile(r"^\s*from (sparseseg[\w.]*) import ([\w, ]+)", re.MULTILINE)


def _documented_names() -> list[str]:
    names = set()
    for doc in DOCS:
        text = doc.read_text()
        names.update(m.group(0) for m in DOTTED.finditer(text))
        for module, items in FROM_IMPORT.findall(text):
            names.update(f"{module}.{item.strip()}" for item in items.split(",") if item.strip())
    return sorted(names)


def resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted``, then take the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_docs_name_some_paths():
    assert len(_documented_names()) > 20


@pytest.mark.parametrize("dotted", _documented_names())
def test_documented_name_resolves(dotted):
    assert resolve(dotted) is not None


def test_public_names_users_import():
    """The names the README and earlier releases teach at package level."""
    import sparseseg
    from sparseseg.benchmark import benchmark
    from sparseseg.demo import run_demo
    from sparseseg.evaluation import evaluate
    from sparseseg.inference import predict
    from sparseseg.models import create_model
    from sparseseg.training import load_checkpoint, save_checkpoint, train
    from sparseseg.visualize import plot_policy

    for fn in (benchmark, run_demo, evaluate, predict, create_model, load_checkpoint, save_checkpoint, train,
               plot_policy, sparseseg.count_macs, sparseseg.create_model):
        assert callable(fn)
