"""What identifies a job: its methods, model, data and settings, hashed into a fingerprint.

The fingerprint is portable: it records the model's content (its state dict) and
configuration, the data's content and the tokenizer's vocabulary and settings, never a path on
this machine, so a job folder copied elsewhere still resumes. The versions of the package and
of torch are recorded in the index beside it, not in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: Configuration keys that say where or with what a model was loaded, not what it computes.
PLACES = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"})


def model_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes and values).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model_sha256(nn.Linear(2, 2)) == model_sha256(nn.Linear(2, 2))
        False
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def model_identity(model: nn.Module, name: str | None) -> dict[str, Any]:
    """The model's name, class, size, content hash and configurations (without paths).

    Example:
        >>> identity = model_identity(nn.Linear(2, 3), None)
        >>> identity["name"], identity["parameters"], identity["configs"]
        ('torch.nn.modules.linear.Linear', 9, {})
    """
    qualified = f"{type(model).__module__}.{type(model).__qualname__}"
    return {
        "name": name or qualified,
        "class": qualified,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": model_sha256(model),
        "configs": model_configs(model),
    }


def model_configs(model: nn.Module) -> dict[str, Any]:
    """Every Hugging Face-style ``config`` in the model (by module name), without paths."""
    configs: dict[str, Any] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        config: Any = getattr(module, "config", None)
        if not callable(getattr(config, "to_dict", None)) or id(config) in seen:
            continue
        seen.add(id(config))
        values = dict(config.to_dict())
        values["attn_implementation"] = getattr(config, "_attn_implementation", None)
        configs[module_name or "model"] = without_places(values)
    return configs


def without_places(value: Any) -> Any:
    """``value`` without the keys in :data:`PLACES` and without absolute paths, recursively.

    Example:
        >>> without_places({"_name_or_path": "/opt/m", "hidden_size": 8, "f": "/tmp/x"})
        {'hidden_size': 8}
    """
    if isinstance(value, Mapping):
        return {
            k: without_places(v)
            for k, v in value.items()
            if k not in PLACES and not (isinstance(v, str) and os.path.isabs(v))
        }
    if isinstance(value, (list, tuple)):
        return [without_places(v) for v in value]
    return value


def fingerprint(identity: Mapping[str, Any]) -> str:
    """SHA-256 of the identity as sorted JSON (values JSON cannot hold are written by repr)."""
    text = json.dumps(as_json(identity), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def as_json(value: Any) -> Any:
    """``value`` as plain JSON types (repr for anything else)."""
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def class_names(model: nn.Module, given: Sequence[str] | None) -> list[str] | None:
    """The classes' names: ``given``, else the model config's ``id2label`` when it names them
    (not the default ``LABEL_0``, ``LABEL_1``, ...), else None."""
    if given is not None:
        return [str(name) for name in given]
    labels = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(labels, Mapping) or not labels:
        return None
    names = [str(labels[k]) for k in sorted(labels, key=int)]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Where two JSON values differ, as ``path: old → new`` lines (leaves only).

    Example:
        >>> differences({"m": [{"n_steps": 2}]}, {"m": [{"n_steps": 3}]})
        ['m[0].n_steps: 2 → 3']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in sorted(set(old) | set(new))
            for line in differences(old.get(key), new.get(key), f"{path}.{key}".lstrip("."))
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            line
            for i, (a, b) in enumerate(zip(old, new))
            for line in differences(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [f"{path}: {_short(old)} → {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
