"""A GPU as the code sees it, on the CPU: count host synchronisations and device mixes.

:class:`OnDevice` is a tensor subclass that keeps real CPU data but reports ``cuda:0``. Inside
:func:`simulated_device`, a dispatch mode creates the tensors that factories ask for on
``cuda`` as such tensors too, and records, each with the stack frame that caused it:

- ``sync``: a read of a device value on the host: ``aten._local_scalar_dense`` (``.item()``,
  ``bool()``, ``int()``, ``float()``), ``aten.nonzero``, a copy from the device to the host
  (``.cpu()``, ``.tolist()``, ``.numpy()``);
- ``upload``: a copy of a host tensor to the device, as ``torch.tensor(python_value,
  device=...)`` makes (a blocking upload);
- ``mix``: an operation whose tensor arguments sit on the device and on the host (0-dim host
  scalars aside, which PyTorch allows).

Nothing runs on a GPU; the counts are those a real one would see. ``torch.cuda._initialized`` is
set while the block runs (so that factory calls on ``cuda`` do not look for a driver) and
restored afterwards.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")


class OnDevice(torch.Tensor):
    """CPU data that reports :data:`DEVICE`."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, requires_grad: bool = False) -> OnDevice:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=DEVICE,
            requires_grad=requires_grad,
        )
        wrapper.data_ = data
        return wrapper

    def __repr__(self) -> str:  # pragma: no cover - debugging only
        return f"OnDevice({self.data_!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        host = _host_copy(func, args, kwargs)
        output = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return output if host else tree_map(_wrap, output)


def _unwrap(value):
    return value.data_ if isinstance(value, OnDevice) else value


def _wrap(value):
    if isinstance(value, torch.Tensor) and not isinstance(value, OnDevice):
        return OnDevice(value)
    return value


def _host_copy(func, args, kwargs) -> bool:
    """Whether ``func`` copies its device argument to the host (its output stays plain)."""
    if func not in (torch.ops.aten._to_copy.default, torch.ops.aten.to.device):
        return False
    device = kwargs.get("device", args[1] if func is torch.ops.aten.to.device else None)
    return device is not None and torch.device(device).type == "cpu"


@dataclass
class Event:
    """One recorded event: ``kind`` (sync, upload, mix), the op, and where it came from."""

    kind: str
    op: str
    site: str


@dataclass
class Recording:
    """What :func:`simulated_device` recorded."""

    events: list[Event] = field(default_factory=list)

    def of(self, kind: str) -> list[Event]:
        return [event for event in self.events if event.kind == kind]

    def sites(self, kind: str) -> list[str]:
        return [event.site for event in self.of(kind)]


class _Simulator(TorchDispatchMode):
    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._note(func, args, kwargs)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == DEVICE.type:
            output = func(*args, **{**kwargs, "device": torch.device("cpu")})
            return tree_map(_wrap, output)
        return func(*args, **kwargs)

    def _note(self, func, args, kwargs) -> None:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [isinstance(t, OnDevice) for t in tensors]
        name = str(func)
        if func is torch.ops.aten._local_scalar_dense.default or "nonzero" in name:
            self._add("sync", name)
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            target = kwargs.get("device")
            if func is torch.ops.aten._to_copy.default and target is not None:
                to_device = torch.device(target).type == DEVICE.type
                if to_device and not any(on_device):
                    self._add("upload", name)
                elif not to_device and any(on_device):
                    self._add("sync", name + " to the host")
            elif func is torch.ops.aten.copy_.default and len(on_device) == 2:
                if on_device[0] and not on_device[1] and tensors[1].dim() > 0:
                    self._add("upload", name)
                elif on_device[1] and not on_device[0]:
                    self._add("sync", name + " to the host")
        elif any(on_device) and any(
            not device and t.dim() > 0 for t, device in zip(tensors, on_device)
        ):
            self._add("mix", name)

    def _add(self, kind: str, op: str) -> None:
        self.recording.events.append(Event(kind, op, _site()))


_FROM_DATA = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor}


class _Uploads(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` builds its tensor with Python dispatch turned off:
    made here on the host and moved, recorded as the upload it is."""

    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self.recording = recording

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in _FROM_DATA and device is not None and torch.device(device) == DEVICE:
            data = args[1] if func is torch.Tensor.new_tensor else args[0]
            if isinstance(data, OnDevice):
                return data if func is torch.as_tensor else OnDevice(data.data_.clone())
            self.recording.events.append(Event("upload", func.__name__, _site()))
            host = {**kwargs, "device": torch.device("cpu")}
            if func is torch.Tensor.new_tensor:
                return OnDevice(torch.tensor(data, **host))
            return OnDevice(func(data, *args[1:], **host))
        return func(*args, **kwargs)


def _site() -> str:
    """The innermost frame of the package, or of the model's library, that caused the event:
    ``captum_chefer/<file>:<line> <function>``, or ``model: <file>:<line>``."""
    frames = [f for f in traceback.extract_stack()[:-3] if "device_sim" not in f.filename]
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or "/captum/" in path or "contextlib" in path:
            continue
        if "captum_chefer/" in path and frame.name == "__torch_function__":
            continue  # the capture mode running the model's own operation
        if "captum_chefer/" in path:
            return f"{path.split('captum_chefer/')[-1]}:{frame.lineno} {frame.name}"
        return f"model: {path.rsplit('/', 2)[-1]}:{frame.lineno} {frame.name}"
    return "?"


def to_device(module: nn.Module) -> nn.Module:
    """Move ``module``'s parameters and buffers to the simulated device, in place."""
    for child in module.modules():
        for name, parameter in list(child._parameters.items()):
            if parameter is not None and not isinstance(parameter, OnDevice):
                moved = OnDevice(parameter.detach())
                child._parameters[name] = nn.Parameter(moved, parameter.requires_grad)
        for name, buffer in list(child._buffers.items()):
            if buffer is not None and not isinstance(buffer, OnDevice):
                child._buffers[name] = OnDevice(buffer)
    return module


def on_device(tensor: torch.Tensor) -> OnDevice:
    """``tensor`` on the simulated device."""
    return OnDevice(tensor)


@contextmanager
def simulated_device() -> Iterator[Recording]:
    """Record every host sync, upload and device mix while the block runs (see the module)."""
    recording = Recording()
    initialized = torch.cuda._initialized
    torch.cuda._initialized = True
    try:
        with _Simulator(recording), _Uploads(recording):
            yield recording
    finally:
        torch.cuda._initialized = initialized
