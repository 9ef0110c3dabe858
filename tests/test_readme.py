"""The README's Python code runs as written: sections "Use from Python" and "Your own PyTorch model".

Every ```python block of a section runs, in order, in one namespace, in a fresh
working directory (runs/ lands there). A block whose first line is
``# file: NAME`` is written to that file instead (a module the others import).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def run_section(section: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "__readme__"}
    blocks = python_blocks(section)
    assert blocks, f"no python code in README section {section!r}"
    for block in blocks:
        first = block.splitlines()[0]
        if first.startswith("# file: "):
            (tmp_path / first[len("# file: ") :].strip()).write_text(block)
            continue
        exec(compile(block, f"README.md ({section})", "exec"), namespace)
    return namespace


@pytest.mark.multiprocess
def test_use_from_python(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pandas", reason="the README's tables are DataFrames (notebook extra)")
    ns = run_section("Use from Python", tmp_path, monkeypatch)
    assert ns["result"].models.shape[0] == 4
    assert ns["again"].config.train.lr == 0.01
    assert ns["same"].run_dir == ns["sim"].run_dir
    assert "average model test accuracy" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_your_own_pytorch_model(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    try:
        ns = run_section("Your own PyTorch model", tmp_path, monkeypatch)
    finally:
        sys.modules.pop("mymodels", None)
    summary = ns["result"].summary
    assert summary["model"]["name"] == "torch:mymodels:make_mlp"
    assert summary["checks"]["exactly_once"]
    assert summary["run"]["average_model_test_accuracy"] > 0.5
