"""Smoke test: every script in examples/ runs to completion and leaves no files in the repository."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
EXPECTED = {"convert_torchvision.py", "select_layers.py", "custom_model.py", "save_load_compare.py"}
TIMEOUT_S = 180  # each example takes < 30 s on two idle cores; allow for a loaded machine


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def test_all_examples_present():
    assert EXPECTED <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path):
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp_path)  # the examples' temporary files land in pytest's tmp dir
    # One intra-op thread: the suite may run beside other processes on few cores, where
    # oversubscribed OpenMP threads slow these small workloads down several times.
    env["OMP_NUM_THREADS"] = "1"
    before = {d: _files(d) for d in (ROOT, ROOT / "examples")}
    proc = subprocess.run([sys.executable, str(script.relative_to(ROOT))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"
    for d, names in before.items():
        new = _files(d) - names
        assert not new, f"{script.name} wrote {sorted(new)} into {d}; examples must write into a temp dir"
