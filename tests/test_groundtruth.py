"""The ground-truth benchmark's smoke run, and the token F1 metric it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captum_chefer.metrics import token_f1

ROOT = Path(__file__).resolve().parents[1]


def test_token_f1_counts_the_top_k_candidates():
    relevance = torch.tensor([[5.0, 0.1, 0.9, 0.3, 0.8], [0.0, 0.0, 0.0, 0.0, 0.0]])
    evidence = torch.tensor([[0, 0, 1, 0, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    candidates = torch.tensor([[False, True, True, True, True], [False, True, True, True, False]])
    result = token_f1(relevance, evidence, candidates)
    # Example 1: [CLS] (5.0) is no candidate, so the top 2 are 0.9 and 0.8: both keywords.
    # Example 2: all tie; the lowest candidate position (1) wins, which is the keyword.
    assert result.per_example.tolist() == [1.0, 1.0]
    one_of_two = token_f1(torch.tensor([[5.0, 0.95, 0.9, 0.3, 0.1]]), evidence[:1], candidates[:1])
    assert one_of_two.per_example.tolist() == [0.5]
    with pytest.raises(ValueError, match="hidden dimension"):
        token_f1(relevance[..., None], evidence)


@pytest.mark.slow
def test_groundtruth_quick_run_writes_table_json_and_figure(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "groundtruth.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "groundtruth_quick.json").read_text())
    methods = {"Chefer (ICCV'21)", "Raw attention", "Rollout", "Attention Grad-CAM"}
    assert methods <= set(results["vision"]["methods"])
    assert methods <= set(results["text"]["methods"])
    assert "Integrated Gradients" in results["vision"]["methods"]
    assert "Layer Integrated Gradients" in results["text"]["methods"]
    table = (tmp_path / "groundtruth_quick.md").read_text()
    assert "| Chefer (ICCV'21) |" in table and "held-out accuracy" in table.lower()
    assert (tmp_path / "groundtruth_quick.png").stat().st_size > 0
