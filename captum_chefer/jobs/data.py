"""Where a job's examples come from: texts, token tensors, images, a DataLoader, files on disk.

Every source yields the same :class:`Batch` and cuts the examples into the same batches on every
process, so that a batch's results do not depend on which rank computes it. Batch ``b`` holds
examples ``b * batch_size`` to ``(b + 1) * batch_size`` (a DataLoader's own batches otherwise).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TEXT_COLUMNS = ("text", "sentence", "content")


@dataclass
class Batch:
    """One batch of examples, with what the metrics need to know about them.

    Attributes:
        inputs: token ids ``(B, T)`` (integer) or images ``(B, C, H, W)`` (float).
        attention_mask: ``(B, T)``, 1 at real tokens; None for images.
        special: ``(B, T)`` bool, True at [CLS]/[SEP]-like tokens the metrics never remove.
        labels: ``(B,)`` class labels, or None.
        evidence: ground truth, or None: ``(B, T)`` bool evidence tokens for text, ``(B, H, W)``
            bool object masks for images.
        start: the index of the batch's first example in the dataset.
    """

    inputs: Tensor
    attention_mask: Tensor | None = None
    special: Tensor | None = None
    labels: Tensor | None = None
    evidence: Tensor | None = None
    start: int = 0

    @property
    def kind(self) -> str:
        """``"text"`` for integer token ids, ``"image"`` otherwise."""
        return "image" if self.inputs.is_floating_point() else "text"

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, count: int) -> Batch:
        """The batch's first ``count`` examples."""

        def head(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[:count]

        return Batch(
            self.inputs[:count],
            head(self.attention_mask),
            head(self.special),
            head(self.labels),
            head(self.evidence),
            self.start,
        )

    def to(self, device: torch.device) -> Batch:
        """The batch with every tensor on ``device``."""

        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device)

        return Batch(
            self.inputs.to(device),
            move(self.attention_mask),
            move(self.special),
            move(self.labels),
            move(self.evidence),
            self.start,
        )


class BatchSource(Protocol):
    """What a job reads: a fixed sequence of batches, the same on every rank."""

    kind: str
    baseline: int | float

    def num_batches(self) -> int:
        """How many batches there are."""
        ...

    def batch_sizes(self) -> list[int]:
        """How many examples each batch holds, in order (without reading the data)."""
        ...

    def batches(self, wanted: Container[int]) -> Iterator[tuple[int, Batch]]:
        """The batches whose index is in ``wanted``, in order, as ``(index, batch)``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts that identify the data (recorded in the job's index)."""
        ...


class TensorSource:
    """Examples held as tensors: token ids with their mask, or images.

    Args:
        inputs: ``(N, T)`` token ids or ``(N, C, H, W)`` images, ``N >= 1``.
        batch_size: examples per batch.
        attention_mask: ``(N, T)`` for token ids (default: all ones).
        special: ``(N, T)`` bool special tokens (default: none).
        labels: ``(N,)`` class ids (ints from 0), or None.
        evidence: ``(N, T)`` or ``(N, H, W)`` bool ground truth, or None.
        baseline: the value removed features get: the [MASK] or padding id for tokens, a pixel
            value for images (default 0: black in ``[0, 1]`` space).

    Example:
        >>> import torch
        >>> source = TensorSource(torch.rand(5, 3, 8, 8), batch_size=2)
        >>> source.num_batches(), [len(b) for _, b in source.batches(range(3))]
        (3, [2, 2, 1])
    """

    def __init__(
        self,
        inputs: Tensor,
        batch_size: int,
        *,
        attention_mask: Tensor | None = None,
        special: Tensor | None = None,
        labels: Tensor | Sequence[int] | None = None,
        evidence: Tensor | None = None,
        baseline: int | float = 0,
    ) -> None:
        _check_batch_size(batch_size)
        if not isinstance(inputs, Tensor) or inputs.dim() < 2 or len(inputs) == 0:
            raise ValueError(
                "inputs must be a tensor of at least one example: (N, T) token ids or "
                f"(N, C, H, W) images, got {_shape_of(inputs)}."
            )
        self.inputs, self.batch_size, self.baseline = inputs, batch_size, baseline
        self.kind = "image" if inputs.is_floating_point() else "text"
        if self.kind == "text":
            attention_mask = torch.ones_like(inputs) if attention_mask is None else attention_mask
            special = torch.zeros_like(inputs, dtype=torch.bool) if special is None else special
        self.fields = {
            "attention_mask": attention_mask,
            "special": special,
            "labels": None if labels is None else label_tensor(labels),
            "evidence": evidence,
        }
        for name, value in self.fields.items():
            if value is not None and len(value) != len(inputs):
                raise ValueError(
                    f"{name} has {len(value)} rows but inputs has {len(inputs)}; pass one row "
                    "per example."
                )

    @property
    def labels(self) -> Tensor | None:
        """``(N,)`` the class ids, or None."""
        return self.fields["labels"]

    def num_batches(self) -> int:
        return -(-len(self.inputs) // self.batch_size)

    def batch_sizes(self) -> list[int]:
        return _fixed_sizes(len(self.inputs), self.batch_size)

    def batches(self, wanted: Container[int]) -> Iterator[tuple[int, Batch]]:
        for index in range(self.num_batches()):
            if index in wanted:
                rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
                fields = {k: None if v is None else v[rows] for k, v in self.fields.items()}
                yield index, Batch(self.inputs[rows], start=rows.start, **fields)

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for tensor in (self.inputs, *self.fields.values()):
            if tensor is not None:
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return {
            "source": "tensors",
            "kind": self.kind,
            "examples": len(self.inputs),
            "batch_size": self.batch_size,
            "baseline": self.baseline,
            "sha256": digest.hexdigest(),
        }


class TextSource:
    """Texts tokenised a batch at a time (padded to the batch's longest text).

    Args:
        texts: the sentences (at least one).
        tokenizer: a Hugging Face tokenizer.
        batch_size: examples per batch.
        labels: one class id (an int from 0) per text, or None.
        max_length: truncate longer texts to this many tokens (None: the tokenizer's limit).
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Any,
        batch_size: int,
        *,
        labels: Sequence[int] | None = None,
        max_length: int | None = None,
    ) -> None:
        _check_batch_size(batch_size)
        if tokenizer is None:
            raise ValueError(
                "Texts need a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)."
            )
        if not texts:
            raise ValueError("No texts: a job needs at least one example.")
        if labels is not None and len(labels) != len(texts):
            raise ValueError(f"{len(labels)} labels for {len(texts)} texts; pass one per text.")
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
        if bad:
            raise ValueError(f"Texts must be non-empty strings; example(s) {bad[:5]} are not.")
        if labels is not None:
            labels = [class_id(label, None, f"example {i}") for i, label in enumerate(labels)]
        self.texts, self.tokenizer, self.batch_size = list(texts), tokenizer, batch_size
        self.labels, self.max_length, self.kind = labels, max_length, "text"
        self.baseline: int | float = _baseline_id(tokenizer)

    def num_batches(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def batch_sizes(self) -> list[int]:
        return _fixed_sizes(len(self.texts), self.batch_size)

    def batches(self, wanted: Container[int]) -> Iterator[tuple[int, Batch]]:
        for index in range(self.num_batches()):
            if index in wanted:
                yield index, self._batch(index)

    def _batch(self, index: int) -> Batch:
        start = index * self.batch_size
        texts = self.texts[start : start + self.batch_size]
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        labels = (
            None if self.labels is None else torch.tensor(self.labels[start : start + len(texts)])
        )
        return Batch(
            encoded["input_ids"],
            encoded["attention_mask"],
            encoded["special_tokens_mask"].bool(),
            labels,
            start=start,
        )

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps([self.texts, self.labels]).encode())
        return {
            "source": "texts",
            "kind": "text",
            "examples": len(self.texts),
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "tokenizer": tokenizer_identity(self.tokenizer),
            "sha256": digest.hexdigest(),
        }


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What makes a tokenizer's ids: its class, vocabulary and settings, never where it was
    loaded from (so a job folder moves between machines and environments).

    Example:
        >>> from captum_chefer.pretrained import load_minilm
        >>> identity = tokenizer_identity(load_minilm()[1])
        >>> identity["class"], "/" in json.dumps(identity)
        ('BertTokenizer', False)
    """
    vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
    settings = {
        key: value
        for key, value in sorted(getattr(tokenizer, "init_kwargs", {}).items())
        if isinstance(value, (bool, int, float, str, type(None)))
        and key not in _TOKENIZER_PLACES
        and not key.endswith("_file")
        and not (isinstance(value, str) and ("/" in value or "\\" in value))
    }
    special = {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
    return {
        "class": type(tokenizer).__name__,
        "vocab_sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "settings": settings,
        "special_tokens": special,
    }


_TOKENIZER_PLACES = ("name_or_path", "is_local", "local_files_only", "cache_dir", "_commit_hash")


class ImageFileSource:
    """Image files read a batch at a time, resized to ``size × size``, in ``[0, 1]``.

    Masks (optional) are files of the same name under ``masks``; any non-zero pixel is object.

    Args:
        files: the image paths.
        batch_size: examples per batch.
        size: the side the images are resized to.
        masks: the folder of masks, or None.
        labels: one class id per image, or None.
    """

    def __init__(
        self,
        files: Sequence[Path],
        batch_size: int,
        size: int,
        *,
        masks: Path | None = None,
        labels: Sequence[int] | None = None,
    ) -> None:
        _check_batch_size(batch_size)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"image_size must be a positive int, got {size!r}.")
        if not files:
            raise ValueError(
                "No image files found: expected files ending in " + ", ".join(IMAGE_SUFFIXES)
            )
        if labels is not None:
            labels = [class_id(label, None, f"image {i}") for i, label in enumerate(labels)]
        self.files, self.batch_size, self.size = list(files), batch_size, size
        self.masks, self.labels, self.kind, self.baseline = masks, labels, "image", 0.0
        if masks is not None:
            missing = [f.name for f in self.files if not (masks / f.name).exists()]
            if missing:
                raise ValueError(
                    f"No mask for {missing[:5]} in {masks}; add one per image or remove the folder."
                )

    def num_batches(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def batch_sizes(self) -> list[int]:
        return _fixed_sizes(len(self.files), self.batch_size)

    def batches(self, wanted: Container[int]) -> Iterator[tuple[int, Batch]]:
        for index in range(self.num_batches()):
            if index in wanted:
                start = index * self.batch_size
                files = self.files[start : start + self.batch_size]
                images = torch.stack([_read_image(f, self.size, "RGB") for f in files])
                masks = None
                if self.masks is not None:
                    masks = torch.stack(
                        [_read_image(self.masks / f.name, self.size, "L")[0] > 0 for f in files]
                    )
                labels = (
                    None
                    if self.labels is None
                    else torch.tensor(self.labels[start : start + len(files)])
                )
                yield index, Batch(images, labels=labels, evidence=masks, start=start)

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.read_bytes())
        return {
            "source": "image files",
            "kind": "image",
            "examples": len(self.files),
            "batch_size": self.batch_size,
            "size": self.size,
            "masks": self.masks is not None,
            "sha256": digest.hexdigest(),
        }


class LoaderSource:
    """A ``DataLoader``'s batches, in its order (it must not shuffle).

    Each batch is a dict with ``input_ids`` and ``attention_mask`` (text; optional
    ``special_tokens_mask``, ``labels``/``label``, ``evidence``) or ``pixel_values``/``images``
    (optional ``labels``, ``masks``), or a tuple ``(inputs, labels)``. :meth:`describe` reads
    every batch once, to fingerprint the data.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, baseline: int | float = 0) -> None:
        if not isinstance(loader.sampler, torch.utils.data.SequentialSampler):
            raise ValueError(
                "The DataLoader shuffles or samples: a resumable, distributed job needs the same "
                "order on every run and every rank. Build it with shuffle=False."
            )
        if loader.batch_sampler is None:
            raise ValueError(
                "The DataLoader does not batch (batch_size=None); a job needs batches: build it "
                "with batch_size=16, say."
            )
        self.loader, self.baseline = loader, baseline
        self.sizes = [len(indices) for indices in loader.batch_sampler]
        if sum(self.sizes) == 0:
            raise ValueError("The DataLoader yields no examples; a job needs at least one.")
        first = next(iter(loader))
        self.kind = _loader_batch(first, 0).kind

    def num_batches(self) -> int:
        return len(self.sizes)

    def batch_sizes(self) -> list[int]:
        return list(self.sizes)

    def batches(self, wanted: Container[int]) -> Iterator[tuple[int, Batch]]:
        start = 0
        for index, raw in enumerate(self.loader):
            batch = _loader_batch(raw, start)
            if len(batch) != self.sizes[index]:
                raise ValueError(
                    f"DataLoader batch {index} holds {len(batch)} examples, its batch sampler "
                    f"{self.sizes[index]}; the collate function must keep one row per example."
                )
            start += len(batch)
            if index in wanted:
                yield index, batch

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for _, batch in self.batches(range(self.num_batches())):
            for tensor in (batch.inputs, batch.attention_mask, batch.labels, batch.evidence):
                if tensor is not None:
                    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return {
            "source": "DataLoader",
            "kind": self.kind,
            "examples": sum(self.sizes),
            "batch_size": self.loader.batch_size,
            "batches": len(self.sizes),
            "baseline": self.baseline,
            "sha256": digest.hexdigest(),
        }


def _loader_batch(raw: Any, start: int) -> Batch:
    if isinstance(raw, (tuple, list)):
        if not raw or not isinstance(raw[0], Tensor):
            raise TypeError("A DataLoader tuple batch must start with the input tensor.")
        return Batch(raw[0], labels=raw[1] if len(raw) > 1 else None, start=start)
    if not isinstance(raw, dict):
        raise TypeError(f"DataLoader batches must be dicts or tuples, got {type(raw).__name__}.")
    labels = raw.get("labels", raw.get("label"))
    if "input_ids" in raw:
        ids = raw["input_ids"]
        mask = raw.get("attention_mask", torch.ones_like(ids))
        special = raw.get("special_tokens_mask", torch.zeros_like(ids)).bool()
        return Batch(ids, mask, special, labels, raw.get("evidence"), start)
    for key in ("pixel_values", "images", "image"):
        if key in raw:
            return Batch(raw[key], labels=labels, evidence=raw.get("masks"), start=start)
    raise KeyError(
        "A DataLoader batch needs 'input_ids' (text) or 'pixel_values' (images); it has "
        f"{sorted(raw)}."
    )


def open_source(
    data: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    image_size: int = 224,
    text_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    max_length: int | None = None,
) -> BatchSource:
    """A :class:`BatchSource` for ``data``, every row checked before the job starts.

    Args:
        data: a ``DataLoader``; a source already; a list of texts; or a path: a ``.jsonl``/
            ``.csv`` file of texts, a Hugging Face ``datasets`` dataset saved with
            ``save_to_disk``, or a folder of images (masks in its ``masks/`` subfolder).
        tokenizer: for texts.
        batch_size: examples per batch (ignored for a DataLoader).
        image_size: the side image files are resized to.
        text_column: the column holding the texts (default: the first of ``text``,
            ``sentence``, ``content``).
        label_column: the column holding labels, if present: class ids (ints from 0, also
            written as text) or class names listed in ``label_names``.
        label_names: the class names in class-id order, to read labels written as names.
        max_length: truncate texts to this many tokens.

    Raises:
        ValueError, FileNotFoundError: for data it cannot read, naming the file, the line
            and what it expected.

    Example:
        >>> import torch
        >>> open_source(torch.zeros(4, 3, 8, 8), batch_size=4).describe()["examples"]
        4
    """
    if isinstance(data, torch.utils.data.DataLoader):
        return LoaderSource(data, 0 if tokenizer is None else _baseline_id(tokenizer))
    if hasattr(data, "batches") and hasattr(data, "num_batches"):
        return _checked_source(data)
    if isinstance(data, Tensor):
        return TensorSource(data, batch_size)
    texts = dict(tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        return TextSource(data, **texts)
    if not isinstance(data, (str, Path)):
        raise TypeError(
            f"Cannot read a dataset from {type(data).__name__}: pass a DataLoader, a list of "
            "texts, a tensor, or a path to a .jsonl/.csv file, a saved HF dataset or an image "
            "folder."
        )
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"No dataset at {path}.")
    names = _name_ids(label_names)
    if path.suffix.lower() in (".jsonl", ".csv"):
        return _file_source(path, text_column, label_column, names, **texts)
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        return _hf_source(path, text_column, label_column, names, image_size, **texts)
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES and "masks" not in f.relative_to(path).parts
        )
        masks = path / "masks" if (path / "masks").is_dir() else None
        return ImageFileSource(files, batch_size, image_size, masks=masks)
    raise ValueError(
        f"Cannot read {path}: expected a .jsonl or .csv file of texts, a folder saved by "
        "datasets' save_to_disk, or a folder of images."
    )


def _checked_source(source: Any) -> BatchSource:
    needed = ("kind", "baseline", "num_batches", "batch_sizes", "batches", "describe")
    missing = [name for name in needed if not hasattr(source, name)]
    if missing:
        raise TypeError(
            f"{type(source).__name__} lacks {missing} of the BatchSource protocol "
            f"({', '.join(needed)})."
        )
    return source


@dataclass(frozen=True)
class _Row:
    """One row of a text file and the line it ends on."""

    line: int
    values: dict[str, Any]


def _file_source(path: Path, text_column, label_column, names, **texts) -> TextSource:
    rows, columns = _read_rows(path)
    column = _text_column(columns, text_column, path)
    sentences = [_row_text(row, column, path) for row in rows]
    labels = None
    if label_column in columns:
        labels = [_row_label(row, label_column, names, path) for row in rows]
    return TextSource(sentences, labels=labels, **texts)


def _read_rows(path: Path) -> tuple[list[_Row], list[str]]:
    """The rows of a ``.jsonl`` or ``.csv`` file and its columns (at least one row)."""
    try:
        rows, columns = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8.") from error
    if not rows:
        raise ValueError(f"{path} holds no examples; {_FILE_SHAPES[path.suffix.lower()]}")
    return rows, columns


_FILE_SHAPES = {
    ".jsonl": 'a .jsonl needs one JSON object per line, e.g. {"text": "a fine film", "label": 1}.',
    ".csv": "a .csv needs a header line naming its columns (e.g. text,label), then one row per "
    "example.",
}


def _csv_rows(path: Path) -> tuple[list[_Row], list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rows = [_Row(reader.line_num, row) for row in reader]
        header = list(reader.fieldnames or [])
    if header and not rows:
        raise ValueError(
            f"{path} has a header ({', '.join(header)}) but no rows; add one row per example "
            "below it."
        )
    for row in rows:
        if None in row.values or None in row.values.values():
            raise ValueError(
                f"{path}, line {row.line}: the row has {'more' if None in row.values else 'fewer'}"
                f" fields than the header ({', '.join(header)}); quote texts that hold commas."
            )
    return rows, header


def _jsonl_rows(path: Path) -> tuple[list[_Row], list[str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
        if not isinstance(values, dict):
            raise ValueError(
                f"{path}, line {number}: a JSON {type(values).__name__}, not an object; "
                + _FILE_SHAPES[".jsonl"]
            )
        rows.append(_Row(number, values))
    return rows, list(dict.fromkeys(key for row in rows for key in row.values))


def _row_text(row: _Row, column: str, path: Path) -> str:
    if column not in row.values:
        raise ValueError(
            f"{path}, line {row.line}: no {column!r} (the row has {sorted(row.values)}); every "
            "row needs its text there, or name the text column with --text-column "
            "(text_column=)."
        )
    text = row.values[column]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"{path}, line {row.line}: {column!r} is {text!r}; every row needs a non-empty text."
        )
    return text


def _row_label(row: _Row, column: str, names: dict[str, int] | None, path: Path) -> int:
    if column not in row.values or row.values[column] in ("", None):
        raise ValueError(
            f"{path}, line {row.line}: no {column!r}, while other rows have one; give every row "
            "a label, or none."
        )
    return class_id(row.values[column], names, f"{path}, line {row.line}")


def class_id(value: Any, names: Mapping[str, int] | None, where: str) -> int:
    """A label as a class id: an int from 0 (also written as text) or a known class name.

    Args:
        value: the label as read.
        names: class name → class id, or None.
        where: the label's place, for the error (``"data.csv, line 3"``).

    Raises:
        ValueError: naming the place and the fix.

    Example:
        >>> class_id("pos", {"neg": 0, "pos": 1}, "line 2"), class_id("3", None, "line 3")
        (1, 3)
        >>> class_id("pos", None, "data.csv, line 4")
        Traceback (most recent call last):
        ...
        ValueError: data.csv, line 4: label 'pos' is not a class id (an int from 0) ...
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[0-9]+", text):
            return int(text)
        folded = {name.casefold(): number for name, number in (names or {}).items()}
        if text.casefold() in folded:
            return folded[text.casefold()]
    known = f"the classes are {', '.join(names)}" if names else "no class names are known"
    raise ValueError(
        f"{where}: label {value!r} is not a class id (an int from 0) nor a known class name "
        f"({known}). Write class ids, or name the classes in id order with --label-names "
        "NAME0 NAME1 ... (label_names=[...] in Python)."
    )


def label_tensor(labels: Tensor | Sequence[int]) -> Tensor:
    """``(N,)`` int64 class ids, refusing floats, bools and negatives.

    Example:
        >>> label_tensor([1, 0, 2]).tolist()
        [1, 0, 2]
    """
    tensor = torch.as_tensor(labels)
    if tensor.dim() != 1 or tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(
            f"labels must be (N,) class ids (ints from 0), got {tuple(tensor.shape)} of "
            f"{tensor.dtype}."
        )
    negative = (tensor < 0).nonzero().flatten().tolist()
    if negative:
        raise ValueError(f"labels must be class ids from 0; example(s) {negative[:5]} are < 0.")
    return tensor.long()


def _name_ids(label_names: Sequence[str] | None) -> dict[str, int] | None:
    if label_names is None:
        return None
    names = list(label_names)
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"label_names must be distinct non-empty names, got {names}.")
    return {name: number for number, name in enumerate(names)}


def _text_column(columns: Sequence[str], column: str | None, where: Any) -> str:
    if column is not None:
        if column not in columns:
            raise ValueError(
                f"{where} has no column {column!r}; its columns are {list(columns)}. Name one "
                "of them with --text-column (text_column=)."
            )
        return column
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"{where} has no text column (looked for {TEXT_COLUMNS}); its columns are "
        f"{list(columns)}. Name it with --text-column (text_column=)."
    )


def _hf_source(path: Path, text_column, label_column, names, image_size, **texts) -> BatchSource:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "Reading a saved Hugging Face dataset needs `datasets`: "
            "pip install 'captum_chefer[jobs]'"
        ) from error
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path} holds splits {list(dataset)}; pass the folder of one split.")
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no examples; a job needs at least one.")
    labels = None
    if label_column in dataset.column_names:
        labels = [
            class_id(label, names, f"{path}, example {i}")
            for i, label in enumerate(dataset[label_column])
        ]
    if "image" in dataset.column_names:
        images = torch.stack(
            [_image_tensor(image, image_size, "RGB") for image in dataset["image"]]
        )
        return TensorSource(images, texts["batch_size"], labels=labels)
    column = _text_column(dataset.column_names, text_column, path)
    return TextSource(list(dataset[column]), labels=labels, **texts)


def _read_image(path: Path, size: int, mode: str) -> Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return _image_tensor(image, size, mode)


def _image_tensor(image: Any, size: int, mode: str) -> Tensor:
    import numpy as np

    resized = image.convert(mode).resize((size, size))
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()) / 255.0
    return array.permute(2, 0, 1) if array.dim() == 3 else array[None]


def _baseline_id(tokenizer: Any) -> int:
    mask_id = getattr(tokenizer, "mask_token_id", None)
    return tokenizer.pad_token_id if mask_id is None else mask_id


def _fixed_sizes(examples: int, batch_size: int) -> list[int]:
    """Batch sizes when every batch but the last is full.

    Example:
        >>> _fixed_sizes(5, 2)
        [2, 2, 1]
    """
    return [min(batch_size, examples - start) for start in range(0, examples, batch_size)]


def _shape_of(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
