"""Dataset jobs keep to their job and their folder.

Shards are bound to the job that wrote them (fingerprint and range of examples in their
metadata), so another job's shard is never read nor kept; a damaged or foreign index is named
with the fix; nothing is read or written through a link or outside the folder; ``JobResults``
names what it cannot verify; the fingerprint holds no path of this machine.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from models import bert
from test_jobs import all_tensors, assert_same_results, token_data

from captum_chefer.jobs import (
    IncompleteResultsWarning,
    JobResults,
    JobSettings,
    Method,
    TextSource,
    run_job,
)
from captum_chefer.jobs.store import write_atomic

ONE_BATCH = JobSettings(batches_per_shard=1)


@pytest.fixture(scope="module")
def model():
    return bert()


def run(model, folder: Path, methods=("AttentionRollout",), data=None, **options):
    """The test job: 10 token examples in 3 shards of 4, 4 and 2."""
    data = token_data() if data is None else data
    return run_job(
        model, data, list(methods), folder, settings=ONE_BATCH, show_progress=False, **options
    )


def metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size])["__metadata__"]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_shard_carries_its_jobs_fingerprint_and_examples(model, tmp_path):
    run(model, tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["shard_examples"] == [[0, 4], [4, 8], [8, 10]]
    for shard, examples in enumerate(("0-4", "4-8", "8-10")):
        stored = metadata(tmp_path / f"shard-{shard:05d}.safetensors")
        assert stored["fingerprint"] == index["fingerprint"]
        assert (stored["shard"], stored["examples"]) == (str(shard), examples)
        record = json.loads((tmp_path / f"shard-{shard:05d}.json").read_text())
        assert record["fingerprint"] == index["fingerprint"]


def test_shards_of_an_earlier_job_are_refused_not_mixed(model, tmp_path):
    """The issue's case: n_steps=2, index.json deleted, rerun with n_steps=3."""
    steps = lambda n: [Method("IntegratedGradients", {"n_steps": n})]  # noqa: E731
    run(model, tmp_path / "job", steps(2))
    (tmp_path / "job" / "index.json").unlink()
    before = files(tmp_path / "job")
    with pytest.raises(ValueError, match=r"holds shard\(s\) 0-2 of another job.*--overwrite"):
        run(model, tmp_path / "job", steps(3))
    assert files(tmp_path / "job") == before  # refused before anything was written
    redone = run(model, tmp_path / "job", steps(3), overwrite=True)
    assert redone.computed == [0, 1, 2] and redone.skipped == []
    run(model, tmp_path / "fresh", steps(3))
    assert_same_results(tmp_path / "job", tmp_path / "fresh")


def test_a_shard_copied_from_another_job_is_never_read(model, tmp_path):
    run(model, tmp_path / "a")
    run(model, tmp_path / "b", data=token_data(seed=1))
    for suffix in (".safetensors", ".json"):  # a shard with its own, matching record
        shutil.copy(tmp_path / "b" / f"shard-00001{suffix}", tmp_path / "a")
    with pytest.warns(IncompleteResultsWarning, match="shard 1 .*bound to job"):
        results = JobResults(tmp_path / "a")
    assert len(results) == 6 and 1 in results.missing
    with pytest.raises(IndexError):
        results[5]
    with pytest.raises(ValueError, match=r"holds shard\(s\) 1 of another job.*--overwrite"):
        run(model, tmp_path / "a")


@pytest.mark.parametrize(
    ("text", "problem"),
    [("garbage", "is damaged \\(not JSON"), ("[]", "is not the index of a captum_chefer job")],
)
def test_damaged_or_foreign_index_names_the_file_and_the_fix(model, tmp_path, text, problem):
    run(model, tmp_path)
    index = tmp_path / "index.json"
    index.write_text(text)
    named = f"{re.escape(str(index))} {problem}.*--overwrite"
    with pytest.raises(ValueError, match=named):
        run(model, tmp_path)
    with pytest.raises(ValueError, match=named):
        JobResults(tmp_path)
    assert index.read_text() == text
    assert run(model, tmp_path, overwrite=True).computed == [0, 1, 2]
    assert JobResults(tmp_path).complete


def test_damaged_index_on_the_command_line(tmp_path, capsys):
    from test_jobs_distributed import TEXTS

    from captum_chefer.jobs.cli import main

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text("")
    command = ["--model", "test_jobs_distributed:tiny_text_model", "--data", str(data)]
    command += ["--out", str(out), "--batch-size", "2", "--methods", "AttentionRollout"]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"{out / 'index.json'} is damaged" in error and "--overwrite" in error
    assert main([*command, "--overwrite"]) == 0
    assert JobResults(out).complete


def test_a_shard_linked_from_outside_is_refused(model, tmp_path):
    folder = tmp_path / "job"
    run(model, folder)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "shard-00001.safetensors", outside)
    (folder / "shard-00001.safetensors").symlink_to(outside)  # its record's checksum matches
    with pytest.raises(ValueError, match="shard-00001.safetensors is a symbolic link"):
        JobResults(folder)
    with pytest.raises(ValueError, match="shard-00001.safetensors is a symbolic link"):
        run(model, folder)


def test_a_planted_report_link_is_never_written_through(model, tmp_path):
    folder = tmp_path / "job"
    run(model, folder)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    (folder / "report.png").unlink()
    (folder / "report.png").symlink_to(victim)
    with pytest.raises(ValueError, match="report.png is a symbolic link"):
        run(model, folder)
    assert victim.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="symbolic link"):
        write_atomic(folder / "report.png", b"x")
    assert victim.read_bytes() == b"keep me"
    run(model, folder, overwrite=True)  # the link is removed, never followed
    assert victim.read_bytes() == b"keep me"
    assert not (folder / "report.png").is_symlink()
    assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_record_naming_a_path_is_never_followed(model, tmp_path):
    run(model, tmp_path / "clean")
    folder = tmp_path / "job"
    run(model, folder)
    record_file = folder / "shard-00001.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "shard": "../../x"}))
    with pytest.warns(IncompleteResultsWarning, match="shard 1 .*disagrees with its shard"):
        results = JobResults(folder)
    assert len(results) == 6
    again = run(model, folder)
    assert again.computed == [1] and again.skipped == [0, 2]
    assert again.redone == {1: "shard-00001.json disagrees with its shard"}
    assert_same_results(folder, tmp_path / "clean")


def test_results_name_unverified_shards_and_the_index_tells_the_truth(model, tmp_path):
    run(model, tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["complete"]
    flip_last_byte(tmp_path / "shard-00002.safetensors")
    with pytest.warns(IncompleteResultsWarning, match="shard 2 \\(examples 8-9\\): .*checksum"):
        results = JobResults(tmp_path)
    assert len(results) == 8 and not results.complete and list(results.missing) == [2]
    assert json.loads((tmp_path / "index.json").read_text())["complete"] is False


def test_overwrite_deletes_only_the_jobs_files(model, tmp_path):
    run(model, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "shard-notes").mkdir()
    with pytest.raises(ValueError, match="holds a different job.*methods"):
        run(model, tmp_path, methods=["RawAttention"])
    summary = run(model, tmp_path, methods=["RawAttention"], overwrite=True)
    assert summary.computed == [0, 1, 2]
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "shard-notes").is_dir()
    assert JobResults(tmp_path).methods == ["RawAttention"]


def test_a_job_that_stored_nothing_gives_way_to_the_corrected_one(model, tmp_path):
    calls = []

    def fails_after_the_first_batch(ids, target, extra):
        calls.append(len(ids))  # the first example alone, batch 0, then batch 1
        return torch.full(ids.shape, float("nan") if len(calls) == 3 else 0.0)

    settings = JobSettings(batches_per_shard=3)
    with pytest.raises(ValueError, match="NaN or inf relevance on examples from 4"):
        run_job(
            model,
            token_data(),
            [fails_after_the_first_batch],
            tmp_path,
            settings=settings,
            show_progress=False,
        )
    assert not list(tmp_path.glob("shard-*"))
    summary = run(model, tmp_path)  # another job, in the folder the failed one left empty
    assert summary.computed == [0, 1, 2] and JobResults(tmp_path).complete


def test_fingerprint_holds_no_path_and_a_copied_folder_resumes(tmp_path):
    from test_jobs_distributed import TEXTS, tiny_text_model
    from transformers import AutoTokenizer

    from captum_chefer.pretrained import minilm_folder

    built = tiny_text_model()
    copy = shutil.copytree(minilm_folder(), tmp_path / "elsewhere" / "tokenizer")
    moved = AutoTokenizer.from_pretrained(copy)
    here, there = (TextSource(TEXTS, t, 4).describe() for t in (built.tokenizer, moved))
    assert here == there
    run_job(
        built,
        TEXTS,
        ["AttentionRollout"],
        tmp_path / "job",
        batch_size=4,
        settings=ONE_BATCH,
        show_progress=False,
    )
    text = (tmp_path / "job" / "index.json").read_text()
    assert str(minilm_folder()) not in text and "site-packages" not in text
    assert '"_name_or_path"' not in text and '"hidden_size": 32' in text  # config, no path
    shutil.copytree(tmp_path / "job", tmp_path / "copied")
    again = run_job(
        built.model,
        TEXTS,
        ["AttentionRollout"],
        tmp_path / "copied",
        tokenizer=moved,
        batch_size=4,
        settings=ONE_BATCH,
        model_name="tiny bert",
        show_progress=False,
    )
    assert again.computed == [] and again.skipped == [0, 1, 2]
    assert_same_results(tmp_path / "copied", tmp_path / "job")
    assert all_tensors(tmp_path / "copied")
