"""Every script in examples/ runs (on tiny models, in-process: the imports are shared)."""

from __future__ import annotations

import runpy
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(monkeypatch, capsys, name, *args) -> str:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *map(str, args)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_attribute_pipeline_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = _run(monkeypatch, capsys, "attribute_pipeline.py", "--tiny")
    assert "(pipeline folder): squaredcos_cap_v2 betas, T = 500" in out
    assert out.count("top proponents") == 2 and out.count("train/0000") == 6


def test_own_images_and_compare_examples(tmp_path, monkeypatch, capsys):
    out = _run(monkeypatch, capsys, "own_images_lds.py", "--tiny", tmp_path / "run")
    assert "dtrak                 val     heldout" in out
    assert (tmp_path / "run" / "results" / "lds.json").exists()
    out = _run(monkeypatch, capsys, "compare_methods.py", tmp_path / "run", "dtrak", "trak")
    assert out.startswith("val: LDS(dtrak) - LDS(trak) = ") and "95% CI" in out


def test_every_example_is_tested_and_short():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["attribute_pipeline.py", "compare_methods.py", "own_images_lds.py"]
    for p in EXAMPLES.glob("*.py"):
        code = [ln for ln in p.read_text().splitlines() if ln.strip()]
        assert len(code) <= 50, f"{p.name} has {len(code)} lines; examples stay short"
