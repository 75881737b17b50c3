"""Each tutorial's notebook is its script's jupytext pair, and it runs top to bottom.

The scripts in ``tutorials/`` are the source; the ``.ipynb`` files are written from them with
``jupytext --update --set-kernel python3 --to ipynb tutorials/*.py``, so the two
can only differ if someone edits one and forgets the other, which the first test catches.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "tutorials").glob("*.py"))
FULL_COLOUR = "hsl(120, 75%, 50%)"  # Captum's colour at word importance 1
SYNC = "run: jupytext --update --set-kernel python3 --to ipynb tutorials/*.py; commit both"


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_script_has_a_notebook_and_back():
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert [p.stem for p in notebooks] == [p.stem for p in SCRIPTS], SYNC


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_notebook_matches_its_script(script: Path):
    paired = jupytext.read(script)
    notebook = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    assert _cells(notebook) == _cells(paired), f"{script.name} and its notebook differ; {SYNC}"
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert not any(cell.get("outputs") for cell in notebook.cells), "commit notebooks unexecuted"


def test_drift_is_detected(tmp_path: Path):
    script = SCRIPTS[0]
    notebook = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    code.source += "\nprint('edited in the notebook only')"
    assert _cells(notebook) != _cells(jupytext.read(script))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_notebook_executes(script: Path, tmp_path: Path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "out"
    for name, value in {
        "CAPTUM_CHEFER_QUICK": "1",
        "CAPTUM_CHEFER_TUTORIAL_OUT": str(out),
        "HF_HUB_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CAPTUM_CHEFER_PRETRAINED", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook's own (inline) backend
    notebook = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    figures = [p for p in out.rglob("*") if p.suffix in (".png", ".html")]
    assert figures and all(p.stat().st_size > 0 for p in figures)
    printed = _stream_text(notebook)
    for figure in figures:  # each output is announced where it goes
        assert str(figure) in printed, f"{figure.name} is written without saying where"
    shown = [o for o in _outputs(notebook) if "image/png" in o.get("data", {})]
    assert len(shown) == len([p for p in figures if p.suffix == ".png"])  # each PNG is shown
    if script.stem != "02_vision_vit":  # the text tutorials show Captum's table, in colour
        html = [
            o["data"]["text/html"] for o in _outputs(notebook) if "text/html" in o.get("data", {})
        ]
        assert any(FULL_COLOUR in page for page in html)
    if script.stem == "03_multimodal_and_generation":
        # Captum's seq_attr_dict keeps one "the"; the tutorial lists every token, in order.
        listed = re.findall(r"^\s+(\d+)\s+(\S+) [+-]\d", printed, flags=re.MULTILINE)
        prompt = ["the", "cat", "sat", "on", "the", "mat", "and", "the", "dog"]
        assert [token for _, token in listed][: len(prompt)] == prompt
        assert [int(position) for position, _ in listed] == list(range(len(listed)))


def _outputs(notebook) -> list[dict]:
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


def _stream_text(notebook) -> str:
    return "".join(o.get("text", "") for o in _outputs(notebook) if o["output_type"] == "stream")
