"""Every tutorial runs top to bottom in its small setting and writes its figures, and its small
setting is honest: the model it explains is trained clearly above chance, or the tutorial says
(and draws) that the maps are not meaningful."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from captum_chefer.viz import UNTRAINED

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))
TRAINS_A_MODEL = {"01_text_minilm", "02_vision_vit"}
"""Tutorials that train what they explain; the others explain random models and say so."""
ACCURACY = re.compile(r"held-out accuracy: ([0-9.]+) \(chance: ([0-9.]+)\)")


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
    _assert_honest(path.stem, result.stdout)


def _assert_honest(name: str, printed: str) -> None:
    """Trained clearly above chance (half way from chance to 1), or the warning is printed."""
    if name not in TRAINS_A_MODEL:
        assert UNTRAINED in printed, f"{name} explains a random model without saying so"
        return
    found = ACCURACY.search(printed)
    assert found, f"{name} does not print its held-out accuracy and chance level"
    accuracy, chance = (float(value) for value in found.groups())
    assert accuracy >= (1 + chance) / 2, f"{name}'s quick mode stays near chance: {accuracy}"
    assert UNTRAINED not in printed
