"""Dataset jobs in one process: results against direct calls, resume, storage, inputs, errors."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from models import bert
from safetensors.torch import load_file

from captum_chefer import AttentionRollout, CheferRelevance
from captum_chefer.jobs import (
    IncompleteResultsWarning,
    JobResults,
    JobSettings,
    Method,
    TensorSource,
    run_job,
)
from captum_chefer.jobs import store as job_store
from captum_chefer.metrics import (
    comprehensiveness,
    perturbation_auc,
    perturbation_curve,
    pointing_game,
    segmentation_scores,
)

MASK_ID = 3


def token_data(n: int = 10, length: int = 9, seed: int = 0) -> TensorSource:
    """Random ids with [CLS]=1 first, [SEP]=2 last real token, then padding 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    positions = torch.arange(length)
    mask = (positions < lengths[:, None]).long()
    ids[:, 0] = 1
    ids[positions == (lengths[:, None] - 1)] = 2
    ids[mask == 0] = 0
    special = (ids == 1) | (ids == 2)
    return TensorSource(ids, 4, attention_mask=mask, special=special, baseline=MASK_ID)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        tensors |= load_file(path)
    return tensors


def assert_same_results(a: Path, b: Path) -> None:
    left, right = all_tensors(a), all_tensors(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def model():
    return bert()


@pytest.fixture(scope="module")
def clean_run(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    settings = JobSettings(batches_per_shard=1)
    summary = run_job(
        model,
        token_data(),
        ["CheferRelevance", "AttentionRollout"],
        folder,
        settings=settings,
        show_progress=False,
    )
    return folder, summary


def test_stored_attributions_and_scores_equal_direct_calls(model, clean_run):
    folder, summary = clean_run
    assert summary.computed == [0, 1, 2] and summary.skipped == []
    data = token_data()
    results = JobResults(folder)
    assert results.complete and len(results) == 10
    ids, mask = data.inputs[4:8], data.fields["attention_mask"][4:8]
    target = model(ids, mask).logits.argmax(-1)
    direct = {
        "CheferRelevance": CheferRelevance(model).attribute(ids, target, (mask,), output="token"),
        "AttentionRollout": AttentionRollout(model).attribute(ids, target, (mask,), output="token"),
    }
    candidates = (mask.bool() & ~data.fields["special"][4:8]).long()
    forward = lambda i, m: model(i, m).logits  # noqa: E731
    options = dict(
        target=target, additional_forward_args=(mask,), baselines=MASK_ID, attention_mask=candidates
    )
    for method, relevance in direct.items():
        curve = perturbation_curve(forward, ids, relevance, score="correct", **options)
        drops = comprehensiveness(forward, ids, relevance, **options).per_example
        for row in range(4):
            example = results[4 + row]
            real = mask[row].bool()
            assert example.target == target[row].item()
            assert torch.equal(example.input_ids, ids[row][real])
            torch.testing.assert_close(example.attributions[method], relevance[row][real].detach())
            scores = example.scores[method]
            assert scores["positive_auc"] == pytest.approx(perturbation_auc(curve)[row].item())
            assert scores["comprehensiveness"] == pytest.approx(drops[row].item(), abs=1e-6)
    index = json.loads((folder / "index.json").read_text())
    assert index["complete"] and index["package"]["version"]
    assert [m["name"] for m in index["methods"]] == ["CheferRelevance", "AttentionRollout"]
    report = (folder / "report.md").read_text()
    assert "| CheferRelevance |" in report and "| AttentionRollout |" in report
    summary_means = json.loads((folder / "summary.json").read_text())
    every = torch.tensor([results[i].scores["CheferRelevance"]["sufficiency"] for i in range(10)])
    assert summary_means["CheferRelevance"]["sufficiency"] == pytest.approx(every.mean().item())


def test_interrupted_shard_is_redone_and_only_it(model, clean_run, tmp_path, monkeypatch):
    writes = []
    original = job_store.write_atomic

    def failing(path, data):
        if path.name == "shard-00001.safetensors":
            path.with_name(path.name + ".partial-1").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt  # the process stops in the middle of writing shard 1
        writes.append(path.name)
        original(path, data)

    monkeypatch.setattr(job_store, "write_atomic", failing)
    methods = ["CheferRelevance", "AttentionRollout"]
    settings = JobSettings(batches_per_shard=1)
    with pytest.raises(KeyboardInterrupt):
        run_job(model, token_data(), methods, tmp_path, settings=settings, show_progress=False)
    assert "shard-00000.safetensors" in writes
    assert not (tmp_path / "shard-00001.safetensors").exists()
    with pytest.warns(IncompleteResultsWarning, match="shard 1 .*not computed yet"):
        partial = JobResults(tmp_path)
    assert not partial.complete and len(partial) == 4
    kept = (tmp_path / "shard-00000.safetensors").stat()
    monkeypatch.setattr(job_store, "write_atomic", original)
    resumed = run_job(
        model, token_data(), methods, tmp_path, settings=settings, show_progress=False
    )
    assert resumed.skipped == [0] and resumed.computed == [1, 2]
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == kept.st_mtime_ns
    assert not list(tmp_path.glob("*.partial-*"))
    assert_same_results(tmp_path, clean_run[0])
    assert JobResults(tmp_path).complete


def test_corrupted_shard_fails_its_checksum_and_is_redone(model, clean_run, tmp_path):
    methods = ["CheferRelevance", "AttentionRollout"]
    settings = JobSettings(batches_per_shard=1)
    run_job(model, token_data(), methods, tmp_path, settings=settings, show_progress=False)
    shard = tmp_path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(IncompleteResultsWarning, match="shard-00002.safetensors fails its checksum"):
        assert len(JobResults(tmp_path)) == 8  # the damaged shard does not count
    again = run_job(model, token_data(), methods, tmp_path, settings=settings, show_progress=False)
    assert again.computed == [2] and again.skipped == [0, 1]
    assert again.redone == {2: "shard-00002.safetensors fails its checksum"}
    assert_same_results(tmp_path, clean_run[0])


def test_results_load_without_pickle(clean_run, monkeypatch):
    folder = clean_run[0]

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must not be used to load job results")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    results = JobResults(folder)
    assert results[9].attributions["CheferRelevance"].dim() == 1
    for path in folder.glob("shard-*.safetensors"):
        raw = path.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])  # safetensors: length, JSON header, raw bytes
        header = json.loads(raw[8 : 8 + size])
        assert header["__metadata__"]["format"] == "captum_chefer.jobs"
        assert b"\x80\x04" not in raw[:2] and raw[8:9] == b"{"


def test_model_is_left_as_it_was(tmp_path):
    model = bert()
    model.bert.encoder.layer[0].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    run_job(
        model,
        token_data(4),
        ["AttentionRollout", "IntegratedGradients"],
        tmp_path,
        show_progress=False,
    )
    assert not any(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )


def tiny_image_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 3),
    ).eval()


def test_image_folder_with_masks_gets_localization_scores(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    (tmp_path / "images" / "masks").mkdir(parents=True)
    pixels = (torch.rand(5, 8, 8, 3, generator=g) * 255).to(torch.uint8)
    for n in range(5):
        Image.fromarray(pixels[n].numpy()).save(tmp_path / "images" / f"{n}.png")
        mask = torch.zeros(8, 8, dtype=torch.uint8)
        mask[n : n + 3, 2:6] = 255
        Image.fromarray(mask.numpy()).save(tmp_path / "images" / "masks" / f"{n}.png")
    model = tiny_image_model()
    run_job(
        model,
        tmp_path / "images",
        [Method("Saliency", {"abs": True})],
        tmp_path / "out",
        batch_size=2,
        image_size=8,
        show_progress=False,
    )
    results = JobResults(tmp_path / "out")
    from captum.attr import Saliency

    images = pixels.permute(0, 3, 1, 2).float() / 255
    masks = torch.zeros(5, 8, 8, dtype=torch.bool)
    for n in range(5):
        masks[n, n : n + 3, 2:6] = True
    target = model(images).argmax(-1)
    maps = (
        Saliency(model)
        .attribute(images.clone().requires_grad_(), target=target)
        .sum(1, keepdim=True)
    )
    stored = torch.stack([results[n].attributions["Saliency"] for n in range(5)])
    torch.testing.assert_close(stored, maps)
    hits = pointing_game(maps[:, 0], masks).per_example
    assert [results[n].scores["Saliency"]["pointing"] for n in range(5)] == hits.tolist()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    expected = segmentation_scores(maps[:, 0], masks).mean_iou.item()
    assert summary["Saliency"]["miou"] == pytest.approx(expected)
    assert "| Saliency |" in (tmp_path / "out" / "report.md").read_text()


def test_text_files_and_saved_hf_dataset_give_the_same_job(tmp_path):
    from captum_chefer.jobs import open_source
    from captum_chefer.pretrained import load_minilm

    tokenizer = load_minilm()[1]
    texts = ["a fine day", "rain again, sadly", "the cat sat on the mat today"]
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": i}) + "\n" for i, t in enumerate(texts))
    )
    (tmp_path / "t.csv").write_text(
        "sentence,label\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(texts))
    )
    import datasets

    datasets.Dataset.from_dict({"text": texts, "label": [0, 1, 2]}).save_to_disk(tmp_path / "hf")
    batches = []
    for name in ("t.jsonl", "t.csv", "hf"):
        source = open_source(tmp_path / name, tokenizer=tokenizer, batch_size=2)
        batches.append([b for _, b in source.batches(range(2))])
    direct = tokenizer(texts[:2], padding=True, return_tensors="pt")
    for batch in (b[0] for b in batches):
        assert torch.equal(batch.inputs, direct["input_ids"])
        assert torch.equal(batch.attention_mask, direct["attention_mask"])
        assert batch.labels.tolist() == [0, 1]
        assert batch.special[:, 0].all() and not batch.special[0, 1]
    assert [len(b[1]) for b in batches] == [1, 1, 1]


def test_bad_inputs_get_clear_errors(model, clean_run, tmp_path):
    data = token_data(4)
    quiet = {"show_progress": False}
    with pytest.raises(ValueError, match="Unknown method 'Chefer'.*Check the spelling"):
        run_job(model, data, ["Chefer"], tmp_path / "a", **quiet)
    with pytest.raises(
        ValueError,
        match="cannot attribute token ids.*LayerIntegratedGradients|cannot attribute token ids",
    ):
        run_job(model, data, ["Occlusion"], tmp_path / "b", **quiet)
    with pytest.raises(ValueError, match="appear twice; give each a distinct name"):
        run_job(model, data, ["AttentionRollout", AttentionRollout], tmp_path / "c", **quiet)
    with pytest.raises(ValueError, match="holds a different job"):
        run_job(model, data, ["AttentionRollout"], clean_run[0], **quiet)
    loader = torch.utils.data.DataLoader(torch.rand(4, 3, 8, 8), batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        run_job(tiny_image_model(), loader, ["Saliency"], tmp_path / "d", **quiet)
    with pytest.raises(ValueError, match="before anything is written.*expects \\(1, 9\\)"):
        run_job(model, data, [lambda ids, t, extra: torch.zeros(4, 3)], tmp_path / "e", **quiet)
    with pytest.raises(ValueError, match="needs labels in the data"):
        run_job(
            model,
            data,
            ["AttentionRollout"],
            tmp_path / "f",
            settings=JobSettings(target="label"),
            **quiet,
        )
    (tmp_path / "x.jsonl").write_text('{"body": "hello"}\n')
    with pytest.raises(ValueError, match="no text column.*text_column="):
        run_job(
            model,
            tmp_path / "x.jsonl",
            ["AttentionRollout"],
            tmp_path / "g",
            tokenizer=object(),
            **quiet,
        )
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        run_job(model, data.inputs, ["AttentionRollout"], tmp_path / "h", batch_size=0, **quiet)
    with pytest.raises(FileNotFoundError, match="No dataset at"):
        run_job(model, tmp_path / "missing.jsonl", ["AttentionRollout"], tmp_path / "i", **quiet)
    with pytest.raises(IndexError, match="rerun the job to finish it"):
        JobResults(clean_run[0])[99]


def test_command_line_errors_name_the_fix(tmp_path, capsys):
    from captum_chefer.jobs.cli import main, parse_method

    common = ["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "Saliency"]
    assert main(["--model", "no_colon_here", *common]) == 2
    assert "'module:function'" in capsys.readouterr().err
    assert main(["--model", "no_such_module_xyz:build", *common]) == 2
    assert "cannot import it" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must read key=value"):
        parse_method("IntegratedGradients:n_steps")
    assert parse_method("Occlusion:sliding_window_shapes=(1,),strides=1").options == {
        "sliding_window_shapes": (1,),
        "strides": 1,
    }
