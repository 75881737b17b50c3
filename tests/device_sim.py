"""A simulated accelerator for counting host synchronisations and device mixing on a CPU.

A GPU pipeline is slowed most by host synchronisations: every read of a device value on the
host (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.tolist()``), every op whose output
shape depends on the data (``nonzero``, boolean indexing, ``masked_select``, ``unique``), every
device-to-host copy, and every blocking host-to-device copy (``torch.tensor(x, device=...)``, a
CPU tensor's ``.to(device)``: a pageable copy synchronises the stream). An op whose tensors sit
on different devices fails on a real GPU. Both can be counted without a GPU:

- :class:`SimTensor` holds a real CPU tensor (``inner``) but reports the simulated device
  (:data:`SIM_DEVICE`), so code under test takes its device paths (``x.device``,
  ``torch.zeros(..., device=x.device)``) as it would on a GPU.
- :class:`DeviceSimulation` is a context manager that enters a ``TorchDispatchMode`` (runs
  every aten op on the inner CPU tensors, wraps the results, records data-dependent reads,
  copies across the host boundary and mixed-device ops) and, while it is active, replaces
  ``torch.tensor``/``torch.as_tensor``/``torch.asarray`` to see uploads of Python values;
  ``SimTensor.tolist`` and ``SimTensor.new_tensor`` record theirs. These never reach the
  dispatcher as ops.

The simulated device is ``meta``: a device type whose ``deviceCount`` and guard exist in every
build, so the autograd engine runs a backward over it. ``cuda`` cannot be reported without a
driver: torch's autograd engine queries the CUDA driver for any tensor on a CUDA device. Code
that branches on the device type sees a non-CPU device, as on a GPU (the package's block size
and empty-row flag do: they take their accelerator paths); only code that asks for ``"cuda"``
by name would differ (the package's distributed jobs pick NCCL for it). A *real* meta tensor
(no data) among the simulated ones is an error, so nothing is silently computed without data.

Each event keeps its Python stack. :attr:`Event.frame` is the innermost frame inside
``captum_chefer``; :attr:`Event.origin` is the innermost frame outside torch and Captum (whose
helpers the package calls), the code that asked. A model's own read (Hugging Face's mask code
reads values) is the model's, not the package's: :attr:`Event.by_package` tells them apart.
:attr:`Event.site` gives both as ``file:line (function)``, :attr:`Event.where` the origin as
``(file, function)`` for assertions that survive edits of line numbers. A
``__torch_function__`` handler that only forwards the call (the package's capture mode runs
the model's own ops so) is not taken as the asker.

Example:
    >>> import torch
    >>> with DeviceSimulation() as sim:
    ...     x = sim.move(torch.arange(4.0))
    ...     with sim.record() as log:
    ...         y = (x * 2).sum()
    ...         value = y.item()  # a read of a device value on the host: one sync
    ...         cpu_sum = x + torch.ones(4)  # a CPU tensor in a device op: a mix
    >>> value, x.device, [event.kind for event in log.events]
    (12.0, device(type='meta'), ['item', 'mix'])
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

SIM_DEVICE = torch.device("meta")
"""The device every simulated tensor reports."""

PACKAGE_DIR = os.path.join(os.sep + "captum_chefer", "")
LIBRARIES = ("torch", "captum")
"""Libraries whose frames never count as the asker: torch itself, and Captum, whose helpers the
package calls (a sync in them is the package's)."""
HARNESS_FILE = os.path.abspath(__file__)

aten = torch.ops.aten

SYNC_KINDS = ("item", "data_dependent", "download", "upload", "python_upload")
"""Event kinds that stall the host on a real GPU: a scalar read (``.item()``, ``bool``,
``int``, ``float``), an op whose output shape or value the host must read (``nonzero``,
boolean indexing, ``torch.equal``, ...), a device-to-host copy (``.cpu()``, ``.tolist()``), a
blocking host-to-device copy of a CPU tensor, and one of a Python value
(``torch.tensor(x, device=...)``)."""

DATA_DEPENDENT_OPS = {
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.allclose.default,
    aten.bincount.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.unique_dim_consecutive.default,
}
"""Ops whose result the host must read from the device before it can go on (the ones whose
CUDA kernels synchronise: output sizes known only from the data, or a bool returned)."""

_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


@dataclass(frozen=True)
class Event:
    """One recorded host synchronisation or device mix.

    Attributes:
        kind: one of :data:`SYNC_KINDS`, ``"mix"`` (tensors on different devices in one op)
            or ``"cpu_scalar"`` (a zero-dim CPU tensor in a device op: CUDA accepts it without
            a copy, so it is neither a mix nor a sync; recorded for information).
        op: the aten op or torch function.
        stack: the Python stack when the event happened, outermost frame first.
        detail: the devices of a mix, or a note.
    """

    kind: str
    op: str
    stack: tuple[traceback.FrameSummary, ...]
    detail: str = ""

    @property
    def frame(self) -> traceback.FrameSummary | None:
        """The innermost frame inside ``captum_chefer`` (of those :attr:`origin` considers)."""
        return next((frame for frame in _askers(self.stack) if _in_package(frame)), None)

    @property
    def origin(self) -> traceback.FrameSummary | None:
        """The innermost frame outside torch and Captum: the code that asked for the event.

        A ``__torch_function__`` handler that only forwards the call (``func(*args,
        **kwargs)``, as the package's capture mode does for the model's own ops) is skipped:
        the code that called the torch function asked.
        """
        return next(_askers(self.stack), None)

    @property
    def by_package(self) -> bool:
        """Whether ``captum_chefer`` itself asked (not the model or the caller it runs)."""
        return self.origin is not None and _in_package(self.origin)

    @property
    def where(self) -> tuple[str, str]:
        """``(file, function)`` of :attr:`origin`, the file from ``captum_chefer/`` (or from
        ``site-packages/``) on: for the package's own events, its frame that asked."""
        return ("<no python frame>", self.op) if self.origin is None else _short(self.origin)

    @property
    def site(self) -> str:
        """``file:line (function)`` of :attr:`frame`, and of :attr:`origin` when it differs."""
        text = _describe(self.frame) if self.frame is not None else ""
        if self.origin is not None and self.origin is not self.frame:
            text = f"{text} via {_describe(self.origin)}" if text else _describe(self.origin)
        return text or "<no python frame>"

    def __str__(self) -> str:
        detail = f" [{self.detail}]" if self.detail else ""
        return f"{self.kind:<14} {self.op:<24} {self.site}{detail}"


@dataclass
class Log:
    """The events recorded in one :meth:`DeviceSimulation.record` block."""

    events: list[Event] = field(default_factory=list)

    @property
    def syncs(self) -> list[Event]:
        """The host synchronisations, in order."""
        return [event for event in self.events if event.kind in SYNC_KINDS]

    @property
    def package_syncs(self) -> list[Event]:
        """The host synchronisations ``captum_chefer`` asked for (not the model's own)."""
        return [event for event in self.syncs if event.by_package]

    @property
    def mixes(self) -> list[Event]:
        """The ops that mixed devices."""
        return [event for event in self.events if event.kind == "mix"]

    def report(self) -> str:
        """One line per sync and mix, for an assertion message."""
        lines = [str(event) for event in self.events if event.kind != "cpu_scalar"]
        return "\n".join(lines) if lines else "(none)"


class SimTensor(torch.Tensor):
    """A tensor that reports :data:`SIM_DEVICE` and keeps its data in a CPU tensor ``inner``.

    Every op on it must run inside a :class:`DeviceSimulation`, which unwraps it.
    """

    inner: torch.Tensor
    __slots__ = ("inner",)
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False) -> SimTensor:
        if isinstance(inner, SimTensor) or inner.device.type != "cpu":
            raise TypeError(
                f"SimTensor wraps a plain CPU tensor, not {type(inner)} on {inner.device}"
            )
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=SIM_DEVICE,
            requires_grad=requires_grad,
        )
        wrapper.inner = inner
        return wrapper

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"SimTensor({self.inner!r}, device='{SIM_DEVICE}')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a SimTensor outside a DeviceSimulation")

    def tolist(self) -> Any:
        """The values as Python numbers: a device-to-host copy."""
        _active().record_event("download", "Tensor.tolist")
        return self.inner.tolist()

    def numpy(self, *, force: bool = False) -> Any:
        raise TypeError("can't convert a device tensor to numpy; use Tensor.cpu() first")

    def new_tensor(self, data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``torch.tensor(data)`` with this tensor's dtype and device by default."""
        kwargs = {"dtype": self.dtype, "device": SIM_DEVICE, **kwargs}
        return _active().uploads.upload(_ORIGINAL_TENSOR, data, *args, **kwargs)


_ACTIVE: DeviceSimulation | None = None
_ORIGINAL_TENSOR = torch.tensor


def _active() -> DeviceSimulation:
    if _ACTIVE is None:
        raise RuntimeError("a SimTensor was used outside a DeviceSimulation")
    return _ACTIVE


def _askers(stack: tuple[traceback.FrameSummary, ...]) -> Iterator[traceback.FrameSummary]:
    """The frames of ``stack`` that may have asked for an event, innermost first."""
    for frame in reversed(stack):
        if any(f"{os.sep}{library}{os.sep}" in frame.filename for library in LIBRARIES):
            continue
        if frame.name == "__torch_function__" and "func(*args, **kwargs)" in (frame.line or ""):
            continue
        yield frame


def _in_package(frame: traceback.FrameSummary) -> bool:
    return PACKAGE_DIR in frame.filename


def _short(frame: traceback.FrameSummary) -> tuple[str, str]:
    name = frame.filename
    for marker in (PACKAGE_DIR, os.path.join("site-packages", "")):
        index = name.rfind(marker)
        if index >= 0:
            start = index + 1 if marker == PACKAGE_DIR else index + len(marker)
            return name[start:], frame.name
    return os.path.basename(name), frame.name


def _describe(frame: traceback.FrameSummary) -> str:
    file, function = _short(frame)
    return f"{file}:{frame.lineno} ({function})"


def _stack() -> tuple[traceback.FrameSummary, ...]:
    frames = traceback.extract_stack()
    return tuple(frame for frame in frames if os.path.abspath(frame.filename) != HARNESS_FILE)


def _is_sim_device(device: Any) -> bool:
    return device is not None and torch.device(device).type == SIM_DEVICE.type


class _Recorder:
    """The event lists recording now, shared by the dispatch mode and the upload patches."""

    def __init__(self) -> None:
        self.logs: list[Log] = []
        self.lock = threading.Lock()

    def add(self, kind: str, op: Any, detail: str = "") -> None:
        if not self.logs:
            return
        event = Event(kind, str(op), _stack(), detail)
        with self.lock:
            for log in self.logs:
                log.events.append(event)


class _DispatchMode(TorchDispatchMode):
    """Runs every aten op on the CPU tensors inside :class:`SimTensor` and records events."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        wrappers: dict[int, SimTensor] = {}
        plain: list[torch.Tensor] = []

        def unwrap(value: Any) -> Any:
            if isinstance(value, SimTensor):
                wrappers[id(value.inner)] = value
                return value.inner
            if isinstance(value, torch.Tensor):
                if value.device.type == SIM_DEVICE.type:
                    raise RuntimeError(
                        f"{func}: a real {SIM_DEVICE.type} tensor (no data) met the simulated "
                        "device; it was created outside DeviceSimulation's reach"
                    )
                plain.append(value)
            return value

        inner_args, inner_kwargs = tree_map(unwrap, (args, kwargs))
        out_on_sim = bool(wrappers)
        if "device" in inner_kwargs and inner_kwargs["device"] is not None:
            out_on_sim = _is_sim_device(inner_kwargs["device"])
            if out_on_sim:
                inner_kwargs["device"] = torch.device("cpu")
        self._record(func, args, kwargs, bool(wrappers), plain, out_on_sim)
        result = func(*inner_args, **inner_kwargs)
        if not out_on_sim:
            return result
        plain_ids = {id(tensor) for tensor in plain}
        return tree_map(lambda value: self._wrap(func, value, wrappers, plain_ids), result)

    def _record(self, func, args, kwargs, has_sim, plain, out_on_sim) -> None:
        add = self.recorder.add
        if func is aten._local_scalar_dense.default:
            if has_sim:
                add("item", func)
            return
        if func is aten._to_copy.default:
            if has_sim and not out_on_sim:
                add("download", func, f"to {kwargs.get('device')}")
            elif not has_sim and out_on_sim:
                add("upload", func, "a CPU tensor moved onto the device")
            return
        if func is aten.copy_.default:
            destination, source = args[0], args[1]
            if isinstance(source, SimTensor) and not isinstance(destination, SimTensor):
                add("download", func)
            elif isinstance(destination, SimTensor) and not isinstance(source, SimTensor):
                add("upload", func, "a CPU tensor copied into a device tensor")
            return
        if has_sim and func in DATA_DEPENDENT_OPS:
            add("data_dependent", func)
        if has_sim and func in _INDEX_OPS and _has_bool_index(args):
            add("data_dependent", func, "boolean-mask indexing")
        if has_sim and plain:
            if any(tensor.dim() > 0 for tensor in plain):
                devices = sorted({str(SIM_DEVICE)} | {str(tensor.device) for tensor in plain})
                add("mix", func, " + ".join(devices))
            else:
                add("cpu_scalar", func)

    @staticmethod
    def _wrap(func, value: Any, wrappers: dict[int, SimTensor], plain_ids: set[int]) -> Any:
        if not isinstance(value, torch.Tensor) or id(value) in plain_ids:
            return value  # (an in-place op on a host tensor returns it)
        if id(value) in wrappers:  # an in-place or out= op returns its argument
            wrapper = wrappers[id(value)]
            if wrapper.shape != value.shape or wrapper.stride() != value.stride():
                raise NotImplementedError(f"{func} changed a SimTensor's metadata in place")
            return wrapper
        if isinstance(value, SimTensor):
            return value
        return SimTensor(value)


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
        for index in indices or ()
    )


class _Uploads:
    """``torch.tensor``, ``torch.as_tensor`` and ``torch.asarray`` replaced while simulating.

    A Python value given to them with a device never reaches the dispatcher as an op (and with
    ``device="meta"`` torch makes a tensor without data), so the upload is recorded here and
    the value wrapped. A function mode would see these calls too, but a mode is switched off
    inside its own handler, so it would miss everything run under ``Tensor.backward`` (hooks).
    """

    NAMES = ("tensor", "as_tensor", "asarray")

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.originals = {name: getattr(torch, name) for name in self.NAMES}

    def __enter__(self) -> None:
        for name, original in self.originals.items():
            setattr(torch, name, self._replacement(original))

    def __exit__(self, *exc: Any) -> None:
        for name, original in self.originals.items():
            setattr(torch, name, original)

    def _replacement(self, original):
        def factory(data, *args, **kwargs):
            return self.upload(original, data, *args, **kwargs)

        factory.__name__ = original.__name__
        factory.__doc__ = original.__doc__
        return factory

    def upload(self, original, data, *args, **kwargs):
        """``original(data, ...)``; on the simulated device: recorded, made on the CPU, wrapped."""
        if not _is_sim_device(kwargs.get("device")) or isinstance(data, SimTensor):
            return original(data, *args, **kwargs)
        if isinstance(data, torch.Tensor):
            self.recorder.add("upload", original.__name__, "a CPU tensor moved onto the device")
        else:
            kind = type(data).__name__
            self.recorder.add("python_upload", original.__name__, f"a Python {kind}")
        result = original(data, *args, **{**kwargs, "device": "cpu"})
        return SimTensor(result.detach(), requires_grad=result.requires_grad)


class DeviceSimulation:
    """Context manager: code inside runs with :class:`SimTensor` as if on a device.

    Create tensors on :data:`SIM_DEVICE` (``device="meta"``), or move a module or tensors there
    with :meth:`move`; wrap the code to measure in :meth:`record`. Leaving restores torch's
    state (the modes are popped, the ``torch.tensor`` lifting flag reset).
    """

    def __init__(self) -> None:
        self._recorder = _Recorder()
        self.uploads = _Uploads(self._recorder)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DeviceSimulation:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("DeviceSimulation is already active")
        self._stack.__enter__()
        self._stack.enter_context(self.uploads)
        self._stack.enter_context(_DispatchMode(self._recorder))
        _ACTIVE = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE
        _ACTIVE = None
        self._stack.__exit__(*exc)

    def move(self, value: Any) -> Any:
        """A module (in place, as ``.to``) or tensor(s) (a copy) on the simulated device."""
        if isinstance(value, nn.Module):
            return _move_module(value)
        if isinstance(value, torch.Tensor):
            return value.to(SIM_DEVICE)
        if isinstance(value, (tuple, list)):
            return type(value)(self.move(item) for item in value)
        if isinstance(value, dict):
            return {key: self.move(item) for key, item in value.items()}
        return value

    def record_event(self, kind: str, op: str, detail: str = "") -> None:
        """Add an event to every block recording now (for code that bypasses the dispatcher)."""
        self._recorder.add(kind, op, detail)

    @contextlib.contextmanager
    def record(self) -> Iterator[Log]:
        """Record every sync and mix inside the block (nested blocks each get them all)."""
        log = Log()
        self._recorder.logs.append(log)
        try:
            yield log
        finally:
            self._recorder.logs.remove(log)


def _move_module(module: nn.Module) -> nn.Module:
    """``module`` with its parameters and buffers on the simulated device, in place.

    ``Module.to`` would give every module its own copy of a shared (tied) parameter, since a
    wrapper subclass cannot take over a tensor's data; a memo keeps the sharing.
    """
    moved: dict[int, torch.Tensor] = {}
    for submodule in module.modules():
        for slots, as_parameter in ((submodule._parameters, True), (submodule._buffers, False)):
            for key, tensor in slots.items():
                if tensor is None:
                    continue
                if id(tensor) not in moved:
                    data = tensor.detach().to(SIM_DEVICE)
                    moved[id(tensor)] = (
                        nn.Parameter(data, tensor.requires_grad) if as_parameter else data
                    )
                slots[key] = moved[id(tensor)]
    return module


def to_cpu(value: Any) -> Any:
    """The CPU tensors inside :class:`SimTensor` results (tuples, lists, dicts kept)."""
    if isinstance(value, SimTensor):
        return value.inner.detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_cpu(item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_cpu(item) for item in value)
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    return value
