"""Dataset jobs across processes: a 2-rank gloo job under torchrun, and a killed job resumed.

Both compare against a single-process run of the same job, bit for bit (1 thread per process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captum_chefer.jobs import (
    IncompleteResultsWarning,
    JobModel,
    JobResults,
    JobSettings,
    run_job,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["CheferRelevance", "AttentionRollout", "IntegratedGradients:n_steps=4"]
TEXTS = [
    "a wonderful film", "a dull and boring evening", "we saw it on saturday", "lovely music",
    "the actors seemed quite awful", "then went home after dinner", "superb", "a long story",
    "it was really terrible", "the cinema near the river", "my friends and i", "delightful",
]  # fmt: skip


def tiny_text_model() -> JobModel:
    """A random 2-layer BERT over MiniLM's vocabulary, with MiniLM's tokenizer (the builder
    the command line imports as ``test_jobs_distributed:tiny_text_model``)."""
    from transformers import BertConfig, BertForSequenceClassification

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    tokenizer = _tokenizer()
    return JobModel(BertForSequenceClassification(config).eval(), tokenizer, name="tiny bert")


def _tokenizer():
    from transformers import AutoTokenizer

    from captum_chefer.pretrained import minilm_folder

    return AutoTokenizer.from_pretrained(minilm_folder())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(out: Path, data: Path) -> list[str]:
    return [
        "-m", "captum_chefer.jobs", "--model", "test_jobs_distributed:tiny_text_model",
        "--data", str(data), "--out", str(out), "--batch-size", "2", "--batches-per-shard", "1",
        "--threads", "1", "--methods", *METHODS,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        out |= load_file(path)
    return out


def _assert_identical(a: Path, b: Path) -> None:
    left, right = _tensors(a), _tensors(b)
    assert left.keys() == right.keys() and len(left) > 0
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, data) -> Path:
    """The job in this process, 1 thread: the reference for the multi-process runs."""
    from captum_chefer.jobs.cli import main

    folder = tmp_path_factory.mktemp("single")
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        assert main(_command(folder, data)[2:]) == 0
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return folder


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_bit_for_bit(tmp_path, data, single):
    out = tmp_path / "two"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
    ]
    result = subprocess.run(
        [*torchrun, *_command(out, data)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.json"))]
    assert [r["rank"] for r in records] == [0, 1, 0, 1, 0, 1]  # each rank took its share
    _assert_identical(out, single)
    assert result.stdout.count("# Attribution job report") == 1  # rank 0 alone reports
    summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((single / "summary.json").read_text())
    for method, scores in reference.items():
        for metric, value in scores.items():
            if metric != "ms_per_example":
                assert summary[method][metric] == value
    assert json.loads((out / "index.json").read_text())["complete"]


KILLER = """
import os, signal, sys
sys.path[:0] = [{tests!r}]
from captum_chefer.jobs import JobSettings, run_job
from captum_chefer.jobs.cli import parse_method
from test_jobs_distributed import TEXTS, METHODS, tiny_text_model
built = tiny_text_model()
def die(shard):
    if shard == 0:
        os.kill(os.getpid(), signal.SIGKILL)
run_job(built.model, TEXTS, [parse_method(m) for m in METHODS], {out!r}, tokenizer=built.tokenizer,
        batch_size=2, settings=JobSettings(batches_per_shard=1), model_name="tiny bert",
        on_shard_done=die)
"""


@pytest.mark.slow
def test_killed_job_resumes_and_redoes_only_what_is_missing(tmp_path, single):
    out = tmp_path / "killed"
    script = KILLER.format(tests=str(ROOT / "tests"), out=str(out))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=ROOT,
    )
    assert result.returncode == -9, result.stderr[-4000:]
    assert [p.name for p in out.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    with pytest.warns(IncompleteResultsWarning, match="5 of 6 shards are missing"):
        assert not JobResults(out).complete
    built = tiny_text_model()
    from captum_chefer.jobs.cli import parse_method

    resumed = run_job(
        built.model,
        TEXTS,
        [parse_method(m) for m in METHODS],
        out,
        tokenizer=built.tokenizer,
        batch_size=2,
        model_name="tiny bert",
        settings=JobSettings(batches_per_shard=1),
        show_progress=False,
    )
    assert resumed.skipped == [0] and resumed.computed == [1, 2, 3, 4, 5]
    _assert_identical(out, single)
