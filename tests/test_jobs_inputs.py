"""Dataset jobs as a user meets them: mistakes caught before anything is written, rows and
labels named by line, the package's own ``JobModel`` taken as is, a command line that says
what it does, and a report that states the accuracy and what was explained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from models import bert
from test_jobs import token_data
from test_jobs_distributed import TEXTS, tiny_text_model

from captum_chefer.jobs import (
    JobModel,
    JobResults,
    JobSettings,
    Method,
    TensorSource,
    open_source,
    run_job,
)
from captum_chefer.jobs.cli import main, parser

TINY = "test_jobs_distributed:tiny_text_model"
QUIET = {"show_progress": False}


@pytest.fixture(scope="module")
def model():
    return bert()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_text_model().tokenizer


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def command(data: Path, out: Path, *methods: str) -> list[str]:
    return [
        "--model",
        TINY,
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--batches-per-shard",
        "1",
        "--methods",
        *methods,
    ]


def test_a_typo_leaves_the_folder_as_it_was_and_the_fix_runs_there(tmp_path, capsys):
    data = jsonl(
        tmp_path / "s.jsonl", [{"text": t, "label": i % 3} for i, t in enumerate(TEXTS[:4])]
    )
    out = tmp_path / "out"
    assert main(command(data, out, "CheferRelevanse", "AttentionRollout")) == 2
    assert not out.exists()
    assert "Did you mean 'CheferRelevance'?" in capsys.readouterr().err
    assert main(command(data, out, "CheferRelevance", "IntegratedGradients:n_steps=abc")) == 2
    assert not out.exists()
    assert "n_steps='abc' must be an int" in capsys.readouterr().err
    assert main(command(data, out, "CheferRelevance", "IntegratedGradients:n_steps=2")) == 0
    assert "| IntegratedGradients |" in capsys.readouterr().out
    assert JobResults(out).complete


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_step": 3}, "has no option 'n_step'; its options are \\[.*'n_steps'"),
        ({"n_steps": "abc"}, "n_steps='abc' must be an int \\(its default is 50\\)"),
        ({"n_steps": 0}, "failed on example 0, tried before anything is written.*larger than zero"),
        ({"method": "nope"}, "failed on example 0.*Approximation method must be one"),
        ({"target": 1}, "the job passes 'target' itself"),
    ],
)
def test_method_options_are_checked_before_anything_is_written(model, tmp_path, options, message):
    folder = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_job(model, token_data(4), [Method("IntegratedGradients", options)], folder, **QUIET)
    assert not folder.exists()


class TwoTokenClassifier(torch.nn.Module):
    """A BERT whose head weighs its first two tokens' states differently: "auto" cannot read
    one row of R for it, so CheferRelevance needs ``token_index=`` (0, say)."""

    def __init__(self) -> None:
        from transformers import BertConfig, BertModel

        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
        self.encoder = BertModel(config).eval()
        self.first, self.second = torch.nn.Linear(32, 2), torch.nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.first(hidden[:, 0]) + self.second(hidden[:, 1])


def test_a_method_default_the_model_needs_is_missed_before_writing(tmp_path):
    classifier = TwoTokenClassifier().eval()
    with pytest.raises(ValueError, match="CheferRelevance failed on example 0.*token_index="):
        run_job(classifier, token_data(4), ["CheferRelevance"], tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    settings = JobSettings(method_defaults={"token_index": 0})
    summary = run_job(
        classifier, token_data(4), ["CheferRelevance"], tmp_path / "out", settings=settings, **QUIET
    )
    assert summary.computed == [0]
    built = JobModel(classifier, method_defaults={"token_index": 0}, name="two tokens")
    again = run_job(built, token_data(4), ["CheferRelevance"], tmp_path / "again", **QUIET)
    for metric, value in summary.report["CheferRelevance"].items():  # the same job, one call
        if metric != "ms_per_example":
            assert again.report["CheferRelevance"][metric] == value


def test_run_job_takes_the_packages_job_model_in_one_call(tmp_path):
    built = tiny_text_model()
    built.class_names = ("sad", "neutral", "glad")
    data = jsonl(
        tmp_path / "s.jsonl",
        [{"text": t, "label": ["sad", "glad", "neutral"][i % 3]} for i, t in enumerate(TEXTS)],
    )
    summary = run_job(built, data, ["AttentionRollout"], tmp_path / "out", batch_size=4, **QUIET)
    results = JobResults(tmp_path / "out")
    assert summary.computed == [0] and results.index["model"]["name"] == "tiny bert"
    assert [results[i].label for i in range(3)] == [0, 2, 1]
    assert results.index["classes"] == ["sad", "neutral", "glad"]
    for start in range(0, len(TEXTS), 4):  # the job's batches, padded alike
        batch = built.tokenizer(TEXTS[start : start + 4], padding=True, return_tensors="pt")
        predicted = built.model(batch["input_ids"], batch["attention_mask"]).logits.argmax(-1)
        assert [results[start + i].predicted for i in range(4)] == predicted.tolist()


def test_a_row_without_its_text_is_named_by_line(tmp_path, tokenizer):
    rows = [{"text": "a fine day"}, {"text": "rain"}, {"body": "no text here"}]
    with pytest.raises(
        ValueError, match="s.jsonl, line 3: no 'text' \\(the row has \\['body'\\]\\)"
    ):
        open_source(jsonl(tmp_path / "s.jsonl", rows), tokenizer=tokenizer)
    (tmp_path / "s.csv").write_text("text,label\nfine,1\nrain\n")
    with pytest.raises(ValueError, match="s.csv, line 3: the row has fewer fields than the header"):
        open_source(tmp_path / "s.csv", tokenizer=tokenizer)
    (tmp_path / "e.jsonl").write_text('{"text": "fine"}\n\n{"text": ""}\n')
    with pytest.raises(ValueError, match="e.jsonl, line 3: 'text' is ''"):
        open_source(tmp_path / "e.jsonl", tokenizer=tokenizer)


def test_labels_must_be_class_ids_or_known_names(tmp_path, tokenizer):
    path = jsonl(
        tmp_path / "s.jsonl", [{"text": "fine", "label": "neg"}, {"text": "rain", "label": "pos"}]
    )
    with pytest.raises(
        ValueError, match="s.jsonl, line 1: label 'neg' is not a class id.*--label-names"
    ):
        open_source(path, tokenizer=tokenizer)
    source = open_source(path, tokenizer=tokenizer, label_names=["neg", "pos"])
    assert source.labels == [0, 1]
    for bad in (0.5, -1, True):
        path = jsonl(
            tmp_path / "b.jsonl", [{"text": "fine", "label": 0}, {"text": "x", "label": bad}]
        )
        with pytest.raises(
            ValueError, match=f"line 2: label {re.escape(repr(bad))} is not a class id"
        ):
            open_source(path, tokenizer=tokenizer)
    (tmp_path / "s.csv").write_text("text,label\nfine,1\nrain,2\n")
    assert open_source(tmp_path / "s.csv", tokenizer=tokenizer).labels == [1, 2]


def test_a_label_the_model_does_not_have_is_refused_before_writing(model, tmp_path):
    data = token_data(4)
    labeled = TensorSource(
        data.inputs,
        4,
        attention_mask=data.fields["attention_mask"],
        special=data.fields["special"],
        labels=torch.tensor([0, 5, 1, 2]),
    )
    with pytest.raises(ValueError, match="Example 1 has label 5, but the model has 3 classes"):
        run_job(model, labeled, ["AttentionRollout"], tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_empty_files_and_a_header_alone_say_so(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no examples; a .jsonl needs one JSON"):
        open_source(tmp_path / "empty.jsonl", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="empty.csv holds no examples; a .csv needs a header"):
        open_source(tmp_path / "empty.csv", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="header.csv has a header \\(text, label\\) but no rows"):
        open_source(tmp_path / "header.csv", tokenizer=tokenizer)


def test_every_option_has_help_with_its_default_and_help_ends_with_an_example():
    cli = parser()
    for action in cli._actions:
        if action.dest != "help":
            assert action.help and re.search(r"\((default: .+|required)\)$", action.help), action
    lines = cli.format_help().rstrip().splitlines()
    assert (
        lines[-3] == "example (rerun the same command to resume; a mistake leaves --out as it was):"
    )
    assert lines[-2].strip().startswith("captum-chefer-job --model minilm --data")


def test_without_a_terminal_progress_is_logged_and_a_resume_names_what_it_skips(tmp_path, capsys):
    data = jsonl(tmp_path / "s.jsonl", [{"text": t} for t in TEXTS[:6]])
    out = tmp_path / "out"
    assert main(command(data, out, "AttentionRollout")) == 0
    err = capsys.readouterr().err
    assert "computing shard(s) 0-2 (6 examples)" in err
    assert re.search(
        r"shard 1 written \(examples 2-3\); 4/6 examples \(67 %\), [\d.]+ examples/s, about", err
    )
    shard = out / "shard-00001.safetensors"
    damaged = bytearray(shard.read_bytes())
    damaged[-1] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    assert main(command(data, out, "AttentionRollout")) == 0
    err = capsys.readouterr().err
    assert "resuming: shard(s) 0, 2 done and verified, skipped" in err
    assert "shard 1: shard-00001.safetensors fails its checksum; computing it again" in err
    assert main(command(data, out, "AttentionRollout")) == 0
    assert "resuming: shard(s) 0-2 done and verified, skipped\n" in capsys.readouterr().err


def test_progress_lines_come_every_log_every_seconds(model, tmp_path, caplog):
    caplog.set_level("INFO", logger="captum_chefer.jobs")
    settings = JobSettings(batches_per_shard=2)
    run_job(model, token_data(), ["AttentionRollout"], tmp_path, settings=settings, log_every=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "captum_chefer.jobs"]
    periodic = [line for line in lines if line.startswith(("4/10", "8/10", "10/10"))]
    assert len(periodic) == 3  # one per batch at log_every=0, besides the per-shard lines
    assert any(line.startswith("shard 0 written (examples 0-7); 8/10") for line in lines)


def labeled_tokens(n: int = 6) -> TensorSource:
    data = token_data(n)
    labels = torch.arange(n) % 3
    return TensorSource(
        data.inputs,
        3,
        attention_mask=data.fields["attention_mask"],
        special=data.fields["special"],
        labels=labels,
        baseline=3,
    )


def test_report_states_accuracy_and_which_class_was_explained(model, tmp_path):
    data = labeled_tokens()
    run_job(model, data, ["AttentionRollout"], tmp_path / "p", **QUIET)
    predicted = model(data.inputs, data.fields["attention_mask"]).logits.argmax(-1)
    right = int((predicted == data.fields["labels"]).sum())
    report = (tmp_path / "p" / "report.md").read_text()
    assert f"Accuracy against the data's labels: {right} of 6 predicted right" in report
    assert "the class the model predicts for each example" in report
    run_job(model, data, ["AttentionRollout"], tmp_path / "c", label_names=["a", "b", "c"], **QUIET)
    assert "Classes: 0 a, 1 b, 2 c." in (tmp_path / "c" / "report.md").read_text()
    settings = JobSettings(target="label")
    run_job(model, data, ["AttentionRollout"], tmp_path / "l", settings=settings, **QUIET)
    report = (tmp_path / "l" / "report.md").read_text()
    assert "Explained class (target): each example's label" in report
    results = JobResults(tmp_path / "l")
    assert [results[i].target for i in range(6)] == data.fields["labels"].tolist()
    run_job(model, token_data(4), ["AttentionRollout"], tmp_path / "n", **QUIET)
    assert (
        "no labels, so the model's accuracy is unknown"
        in (tmp_path / "n" / "report.md").read_text()
    )


def test_curves_carry_arrows_and_the_example_count(model, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = []
    original = Figure.savefig

    def keep(figure, target, **options):
        seen.append((figure.get_suptitle(), [axis.get_title() for axis in figure.axes]))
        return original(figure, target, **options)

    monkeypatch.setattr(Figure, "savefig", keep)
    run_job(model, labeled_tokens(), ["AttentionRollout"], tmp_path, **QUIET)
    ((title, panels),) = seen
    assert "Mean curves over 6 examples" in title and "↑ higher is better" in title
    arrows = [panel.split("\n")[0][-1] for panel in panels]
    assert arrows == ["↓", "↑", "↓", "↑"]  # positive, negative, deletion, insertion
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_the_random_state_and_threads_are_left_as_they_were(model, tmp_path):
    torch.manual_seed(5)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    run_job(model, token_data(4), ["AttentionRollout"], tmp_path, **QUIET)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


@pytest.mark.slow
def test_the_readmes_python_call_with_the_shipped_minilm(tmp_path, monkeypatch):
    from captum_chefer.jobs import minilm_sentiment

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    methods = ["CheferRelevance", "AttentionRollout"]
    assert f'`run_job(minilm_sentiment(), "sentences.jsonl", {json.dumps(methods)}, ' in readme
    monkeypatch.chdir(tmp_path)
    rows = [
        {"text": "a wonderful, moving film", "label": "positive"},
        {"text": "dull and far too long", "label": "negative"},
    ]
    jsonl(tmp_path / "sentences.jsonl", rows)
    summary = run_job(minilm_sentiment(), "sentences.jsonl", methods, "runs/minilm")
    results = JobResults("runs/minilm")
    assert summary.computed == [0] and [e.label for e in results] == [1, 0]
    assert results[0].attributions["CheferRelevance"].shape == results[0].input_ids.shape
    assert "Classes: 0 negative, 1 positive." in Path("runs/minilm/report.md").read_text()


def test_a_model_that_fails_on_the_data_is_named_before_writing(tmp_path):
    images = torch.rand(4, 3, 8, 8)
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 2))  # wants 5 features
    with pytest.raises(ValueError, match="The model failed on example 0, tried before anything"):
        run_job(wrong, images, ["Saliency"], tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
