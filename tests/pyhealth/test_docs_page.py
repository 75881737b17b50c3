"""docs/PYHEALTH.md's Python blocks run as written, and the reproduction prints what the page
says it prints (numbers to 1e-4)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "PYHEALTH.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```$", PAGE, flags=re.DOTALL | re.MULTILINE)
PRINTED = re.findall(r"^Its output.*?\n\n```text\n(.*?)^```$", PAGE, flags=re.DOTALL | re.MULTILINE)
NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")


def run(code: str, tmp_path: Path) -> str:
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def same_up_to_numbers(printed: str, expected: str) -> bool:
    if NUMBER.sub("#", printed) != NUMBER.sub("#", expected):
        return False
    pairs = zip(NUMBER.findall(printed), NUMBER.findall(expected))
    return all(abs(float(a) - float(b)) <= 1e-4 for a, b in pairs)


def test_the_page_has_its_blocks() -> None:
    assert len(BLOCKS) == 2 and len(PRINTED) == 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs_as_written(index: int, tmp_path: Path) -> None:
    printed = run(BLOCKS[index], tmp_path)
    if index == 1:  # the reproduction
        lines = [line.rstrip() for line in printed.splitlines() if not line.startswith("Label ")]
        assert same_up_to_numbers("\n".join(lines), PRINTED[0].rstrip("\n")), printed
