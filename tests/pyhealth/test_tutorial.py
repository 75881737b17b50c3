"""``tutorials/04_pyhealth`` runs top to bottom in its quick setting, as a script and as its
paired notebook, with the checks the main suite applies to the other tutorials (which it runs
on Python 3.11, where PyHealth is missing): figures written and announced, each PNG shown,
and here also the model trained beyond chance and our Chefer equal to PyHealth's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tutorials" / "04_pyhealth.py"
QUICK = {"CAPTUM_CHEFER_QUICK": "1", "HF_HUB_OFFLINE": "1"}


def check_printed(printed: str, out: Path) -> None:
    figures = [p for p in out.rglob("*") if p.suffix in (".png", ".md")]
    assert {p.name for p in figures} == {"pyhealth_patient.png", "pyhealth_scores.md"}
    assert all(p.stat().st_size > 0 for p in figures)
    for figure in figures:
        assert str(figure) in printed, f"{figure.name} is written without saying where"
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+)", printed).group(1))
    assert accuracy >= 0.8, "quick mode must train well beyond chance (0.5)"
    gap = float(re.search(r"ours vs PyHealth's Chefer, largest difference: (\S+)", printed)[1])
    assert gap < 1e-5


def test_script_runs_and_writes_figures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, **QUICK, "CAPTUM_CHEFER_TUTORIAL_OUT": str(out), "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    check_printed(result.stdout, out)


def test_notebook_executes(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    for name, value in {**QUICK, "CAPTUM_CHEFER_TUTORIAL_OUT": str(out)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook's own (inline) backend
    notebook = nbformat.read(SCRIPT.with_suffix(".ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    printed = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    check_printed(printed, out)
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 1  # the patient's picture
