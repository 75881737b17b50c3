"""Every tutorial runs top to bottom in its small setting and writes its figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[path.name for path in TUTORIALS])
def test_tutorial_runs_and_writes_figures(path: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CAPTUM_CHEFER_QUICK": "1",
        "CAPTUM_CHEFER_TUTORIAL_OUT": str(tmp_path / "out"),
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    env.pop("CAPTUM_CHEFER_PRETRAINED", None)
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    figures = [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".png", ".html", ".svg")]
    assert figures, f"{path.name} wrote no figure to $CAPTUM_CHEFER_TUTORIAL_OUT"
    assert all(p.stat().st_size > 0 for p in figures)
