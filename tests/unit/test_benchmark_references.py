"""The benchmarks are scripts nothing else imports: a name they use from the project that
moves or goes away would only show when someone runs one. Each is imported here, and
every `module.name` it reads from a project module must exist."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


@pytest.fixture(autouse=True)
def benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # they import each other as scripts do


def ours(module: types.ModuleType) -> bool:
    """A module of the project: fabfile's, or another benchmark script."""
    return module.__name__.startswith("fabfile") or Path(getattr(module, "__file__", None) or "/").parent == BENCHMARKS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_project_name_a_benchmark_reads_exists(script):
    module = importlib.import_module(script.stem)
    project_modules = {name: value for name, value in vars(module).items() if isinstance(value, types.ModuleType) and ours(value)}
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in project_modules:
            if not hasattr(project_modules[node.value.id], node.attr):
                missing.append(f"{script.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not missing, missing


def test_there_are_benchmarks_to_check():
    assert len(SCRIPTS) >= 5
