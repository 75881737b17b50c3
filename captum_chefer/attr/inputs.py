"""Checks for the mistakes people make first: a tokenizer's output as ``inputs``, a class name
as ``target``, a target past the last class, a forward that returns a tuple, padding without
its attention mask.

Captum answers most of these with an ``AssertionError`` that names no fix (and vanishes under
``python -O``) or a bare ``IndexError``. Each check here raises (or, for padding, warns) with
the cause in one sentence and the call that fixes it. They are pure functions of what
``attribute`` was given: :func:`check_inputs` runs before anything else, :func:`check_target`
where the target is applied to the output, :func:`not_a_tensor` builds the error for an output
that is not a tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

TOKENIZER_OUTPUT = (
    "inputs is {kind} (a tokenizer's or processor's output), but attribute() takes tensors. "
    "Pass the tensor itself and give the rest to forward_func through "
    "additional_forward_args:\n{call}"
)

TARGET_TYPES = (
    "target must be None, an int class index, a tuple of ints, a LongTensor with one index per "
    "example, or a list with one int (or tuple) per example"
)

UNMASKED_PADDING = (
    "The token ids hold the model's pad id (config.pad_token_id = {pad}) but no attention mask "
    "was passed, so the model attends to the padding and relevance spreads onto it. Pass the "
    'mask: explainer.attribute(batch["input_ids"], target=..., '
    'additional_forward_args=(batch["attention_mask"],)) with forward_func = '
    "lambda ids, mask: model(ids, attention_mask=mask).logits. (If forward_func masks the "
    "padding itself, ignore this warning.)"
)


def check_inputs(
    inputs: Any, additional_forward_args: Any = None, model: nn.Module | None = None
) -> None:
    """Refuse what is not a tensor (or tuple of tensors); warn on padding without a mask.

    Args:
        inputs: what ``attribute`` was given as ``inputs``.
        additional_forward_args: what it was given as ``additional_forward_args``.
        model: the explained model; its ``config.pad_token_id`` (Hugging Face) enables the
            padding check.

    Raises:
        TypeError: for a ``BatchEncoding`` or dict (naming the exact call), a list, a string or
            any other non-tensor, alone or inside a tuple.

    Warns:
        UserWarning: when integer ids hold ``config.pad_token_id`` and no tensor shaped like
            the ids (an attention mask) is in ``additional_forward_args``.

    Example:
        >>> check_inputs(torch.zeros(2, 3))
        >>> check_inputs({"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)})
        Traceback (most recent call last):
        ...
        TypeError: inputs is a dict (a tokenizer's or processor's output), but attribute() ...
    """
    elements = inputs if isinstance(inputs, tuple) else (inputs,)
    for position, element in enumerate(elements):
        if not isinstance(element, Tensor):
            where = "inputs" if not isinstance(inputs, tuple) else f"inputs[{position}]"
            raise TypeError(_not_a_tensor_input(element, where))
    warn_unmasked_padding(elements, additional_forward_args, model)


def tokenizer_output_call(batch: Mapping[str, Any]) -> str:
    """The ``attribute`` call that passes a tokenizer's (or processor's) output correctly.

    Example:
        >>> print(tokenizer_output_call({"input_ids": 0, "token_type_ids": 0, "attention_mask": 0}))
            explainer = CheferRelevance(lambda ids, mask: model(ids, attention_mask=mask).logits, model=model)
            explainer.attribute(batch["input_ids"], target=..., additional_forward_args=(batch["attention_mask"],))
        >>> print(tokenizer_output_call({"pixel_values": 0}))
            explainer = CheferRelevance(lambda pixels: model(pixels).logits, model=model)
            explainer.attribute(batch["pixel_values"], target=...)
    """  # noqa: E501
    if "input_ids" in batch:
        main, argument, call = "input_ids", "ids", "model(ids"
    elif "pixel_values" in batch:
        main, argument, call = "pixel_values", "pixels", "model(pixels"
    else:
        main, argument, call = next(iter(batch)), "x", "model(x"
    if "attention_mask" in batch and main != "attention_mask":
        forward = f"lambda {argument}, mask: {call}, attention_mask=mask).logits"
        extra = ', additional_forward_args=(batch["attention_mask"],)'
    else:
        forward, extra = f"lambda {argument}: {call}).logits", ""
    return (
        f"    explainer = CheferRelevance({forward}, model=model)\n"
        f'    explainer.attribute(batch["{main}"], target=...{extra})'
    )


def _not_a_tensor_input(element: Any, where: str) -> str:
    kind = type(element).__name__
    if isinstance(element, Mapping):
        article = "a" if kind[0].lower() not in "aeiou" else "an"
        message = TOKENIZER_OUTPUT.format(
            kind=f"{article} {kind}", call=tokenizer_output_call(element)
        )
        return message if where == "inputs" else message.replace("inputs is", f"{where} is", 1)
    if isinstance(element, str):
        return (
            f"{where} is a string; tokenize it first: batch = tokenizer(texts, padding=True, "
            'return_tensors="pt"), then pass batch["input_ids"] as inputs and '
            '(batch["attention_mask"],) as additional_forward_args.'
        )
    if isinstance(element, list):
        return (
            f"{where} is a list; pass a tensor (torch.tensor(...)), or several inputs as a tuple "
            "of tensors: tuple(inputs)."
        )
    return f"{where} is {kind}; attribute() takes a tensor or a tuple of tensors."


def warn_unmasked_padding(
    inputs: Sequence[Tensor], additional_forward_args: Any, model: nn.Module | None
) -> None:
    """Warn when integer ids hold the model's pad id and no attention mask was passed.

    A mask counts as passed when ``additional_forward_args`` holds a tensor shaped like any of
    the integer inputs. An encoder-decoder whose decoder starts from the pad id (T5) is not
    warned about for that first position.

    Example:
        >>> from types import SimpleNamespace
        >>> model = nn.Module()
        >>> model.config = SimpleNamespace(pad_token_id=0)
        >>> ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
        >>> warn_unmasked_padding((ids,), (torch.ones(2, 3),), model)  # the mask is passed
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_unmasked_padding((ids,), None, model)
        >>> "config.pad_token_id = 0" in str(caught[0].message)
        True
    """
    config = _config(model)
    pad = _pad_token_id(config)
    if pad is None:
        return
    ids = [tensor for tensor in inputs if _is_integer(tensor) and tensor.dim() >= 2]
    extra = additional_forward_args
    extra = extra if isinstance(extra, tuple) else (extra,)
    shapes = {tensor.shape for tensor in extra if isinstance(tensor, Tensor)}
    if any(tensor.shape in shapes for tensor in ids):
        return
    start = getattr(config, "decoder_start_token_id", None)
    for tensor in ids:
        padding = tensor == pad
        if start == pad:
            padding = padding[..., 1:]  # the decoder's start token, not padding
        if bool(padding.any()):
            warnings.warn(UNMASKED_PADDING.format(pad=pad), UserWarning, stacklevel=4)
            return


def _config(model: nn.Module | None) -> Any:
    if model is None:
        return None
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            return config
    return None


def _pad_token_id(config: Any) -> int | None:
    if config is None:
        return None
    pad = getattr(config, "pad_token_id", None)
    if pad is None and callable(getattr(config, "get_text_config", None)):
        pad = getattr(config.get_text_config(), "pad_token_id", None)
    return pad if isinstance(pad, int) else None


def _is_integer(tensor: Tensor) -> bool:
    return (
        not tensor.dtype.is_floating_point
        and not tensor.dtype.is_complex
        and (tensor.dtype != torch.bool)
    )


def check_target(output: Tensor, target: Any) -> Tensor | None:
    """Refuse a target Captum would reject with an ``AssertionError`` or an ``IndexError``.

    A class name, a target past the last class (naming how many there are), a float tensor,
    a list whose length is not the batch size, a class index on an output with one value per
    example: each gets the cause and the fix. What passes is what Captum's target selection
    accepts: an int, a tuple, a scalar or ``(B,)`` integer tensor, a list of ``B`` ints or
    tuples.

    Args:
        output: the model's output, ``(B, C)`` for a classifier.
        target: the ``target`` given to ``attribute``.

    Returns:
        None; or, for a per-example target tensor on an accelerator, bool ``(B,)``: whether
        each index lies in ``[0, C)``, for the caller to read with its other checks in one
        synchronisation (:func:`target_range_error` then names the first bad one).

    Raises:
        TypeError: a string, a float tensor, or another type Captum does not take.
        IndexError: a class index outside ``[0, C)`` (ints and tuples may count from the end,
            as in Python).
        ValueError: a per-example target whose length is not the batch size.

    Example:
        >>> logits = torch.zeros(4, 2)
        >>> check_target(logits, 1)
        >>> check_target(logits, 2)
        Traceback (most recent call last):
        ...
        IndexError: target=2 is out of range: the output has 2 classes (shape (4, 2)), ...
        >>> check_target(logits, "positive")
        Traceback (most recent call last):
        ...
        TypeError: target='positive' is a string; target takes the class index, ...
    """
    if target is None:
        return None
    if isinstance(target, str) or _holds_strings(target):
        raise TypeError(
            f"target={target!r} is a string; target takes the class index, an int. For a "
            "Hugging Face classifier, look it up by name: "
            f"target=model.config.label2id[{_first_string(target)!r}]."
        )
    if isinstance(target, Tensor):
        return _check_tensor_target(output, target)
    if isinstance(target, bool) or not isinstance(target, (int, tuple, list)):
        hint = " Convert it with int(target)." if hasattr(target, "__index__") else ""
        raise TypeError(f"{TARGET_TYPES}; got {type(target).__name__}.{hint}")
    if isinstance(target, list):
        _check_list_target(output, target)
    else:
        _check_index(output, target, target)
    return None


def _holds_strings(target: Any) -> bool:
    return isinstance(target, (list, tuple)) and any(isinstance(t, str) for t in target)


def _first_string(target: Any) -> str:
    if isinstance(target, str):
        return target
    return next(t for t in target if isinstance(t, str))


def _check_tensor_target(output: Tensor, target: Tensor) -> Tensor | None:
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"target is a {target.dtype} tensor; class indices must be integers: "
            "pass target.long() (or argmax(-1) of scores)."
        )
    batch = output.shape[0]
    if target.numel() == 1 and target.device.type == "cpu":
        _check_index(output, int(target.item()), target)
        return None
    if target.numel() != 1 and (target.dim() != 1 or target.numel() != batch):
        raise ValueError(
            f"target has shape {tuple(target.shape)} for a batch of {batch}; give one class "
            f"index per example, shape ({batch},), or one int for all."
        )
    if output.dim() != 2 or target.device.type == "cpu":
        _check_classes(output, target, target)
        return None
    return (target >= 0) & (target < output.shape[1])  # read with the call's other checks


def target_range_error(output: Tensor, target: Tensor) -> IndexError:
    """The error :func:`check_target` raises for an index out of range (reads the device)."""
    try:
        _check_classes(output.detach().cpu(), target.reshape(-1).cpu(), target)
    except IndexError as error:
        return error
    return IndexError(f"target={target!r} is out of range for an output of shape {output.shape}")


def _check_list_target(output: Tensor, target: list[Any]) -> None:
    batch = output.shape[0]
    if len(target) != batch:
        raise ValueError(
            f"target is a list of {len(target)} for a batch of {batch}; give one entry per "
            "example, or one int for all."
        )
    if all(isinstance(t, int) and not isinstance(t, bool) for t in target):
        _check_classes(output, torch.tensor(target), target)
    elif all(isinstance(t, tuple) for t in target):
        for entry in target:
            _check_index(output, entry, target)
    else:
        kinds = sorted({type(t).__name__ for t in target})
        raise TypeError(f"{TARGET_TYPES}; got a list of {', '.join(kinds)}.")


def _check_classes(output: Tensor, indices: Tensor, target: Any) -> None:
    """Per-example class indices: ``output`` must be ``(B, C)`` and each index in ``[0, C)``."""
    if output.dim() != 2:
        raise ValueError(
            f"A per-example target picks one class per example from a (B, C) output, but the "
            f"output has shape {tuple(output.shape)}; pass an int or a tuple, or make "
            "forward_func return (B, C) scores."
        )
    classes = output.shape[1]
    bad = (indices < 0) | (indices >= classes)
    if bool(bad.any()):
        value = int(indices[bad][0])
        raise IndexError(
            f"target holds {value}, out of range: the output has {classes} classes "
            f"(shape {tuple(output.shape)}), so each index must lie in 0 … {classes - 1}."
        )


def _check_index(output: Tensor, index: int | tuple[Any, ...], target: Any) -> None:
    """One index (or tuple of indices) into the dimensions after the batch."""
    indices = index if isinstance(index, tuple) else (index,)
    if len(indices) > output.dim() - 1:
        if output.dim() == 1:
            raise IndexError(
                f"target={target!r} picks a class, but forward_func returns one value per "
                f"example (shape {tuple(output.shape)}); pass target=None."
            )
        raise IndexError(
            f"target={target!r} has {len(indices)} indices, but the output of shape "
            f"{tuple(output.shape)} has {output.dim() - 1} dimensions after the batch."
        )
    for dim, value in enumerate(indices, start=1):
        if isinstance(value, bool) or not isinstance(value, int):
            continue  # slices and the like: Captum's business
        size = output.shape[dim]
        if not -size <= value < size:
            raise IndexError(_out_of_range(target, output, dim, size))


def _out_of_range(target: Any, output: Tensor, dim: int, size: int) -> str:
    if dim == 1 and output.dim() == 2:
        return (
            f"target={target!r} is out of range: the output has {size} classes (shape "
            f"{tuple(output.shape)}), so target must be a class index in 0 … {size - 1}."
        )
    return (
        f"target={target!r} is out of range: dimension {dim} of the output (shape "
        f"{tuple(output.shape)}) has {size} entries, indices 0 … {size - 1}."
    )


def not_a_tensor(output: Any) -> TypeError:
    """The error for a ``forward_func`` that returned something other than a tensor.

    A tuple is what Hugging Face models return with ``return_dict=False``; its first element
    holds the logits of a classifier.

    Example:
        >>> print(not_a_tensor((torch.zeros(1), torch.zeros(1))))  # doctest: +ELLIPSIS
        forward_func returned a tuple of 2; it must return one tensor of scores, e.g. ...
    """
    if isinstance(output, (tuple, list)):
        return TypeError(
            f"forward_func returned a {type(output).__name__} of {len(output)}; it must return "
            "one tensor of scores, e.g. a classifier's logits (B, C). Take the logits from it: "
            "lambda ids, mask: model(ids, attention_mask=mask)[0], or .logits where the model "
            "returns an output object."
        )
    return TypeError(
        f"forward_func returned {type(output).__name__}, which has no .logits; it must return "
        "one tensor of scores: a classifier's logits (model(...).logits, or [0] of a tuple), or "
        "a score computed from the hidden states (e.g. a cosine similarity of pooled "
        "embeddings, as in python -m captum_chefer.demo)."
    )
