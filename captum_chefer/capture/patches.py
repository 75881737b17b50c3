"""Per-thread method wrappers on the user's modules, for the few things a function mode can't see.

:func:`scoped_method` makes ``obj.name(...)`` call ``wrapper(original, ...)`` on the calling
thread only, for the duration of a block. The instance attribute is installed once, under a
lock, by the first block that needs it, and restored by the last one to leave, so overlapping
attributions on several threads never save each other's wrapper as "the original", and a
plain call on another thread goes straight to the original.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_MISSING = object()
_LOCK = threading.Lock()
_LOCAL = threading.local()


class _Dispatcher:
    """The installed attribute: calls this thread's wrapper if it has one, else the original."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name
        self.saved = obj.__dict__.get(name, _MISSING)
        self.original = getattr(obj, name)
        self.users = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wrapper = _wrappers().get(id(self))
        if wrapper is None:
            return self.original(*args, **kwargs)
        return wrapper(self.original, *args, **kwargs)

    def restore(self) -> None:
        if self.saved is _MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            self.obj.__dict__[self.name] = self.saved


_INSTALLED: dict[tuple[int, str], _Dispatcher] = {}


def _wrappers() -> dict[int, Callable[..., Any]]:
    if not hasattr(_LOCAL, "wrappers"):
        _LOCAL.wrappers = {}
    return _LOCAL.wrappers


@contextmanager
def scoped_method(obj: Any, name: str, wrapper: Callable[..., Any]) -> Iterator[None]:
    """Route ``obj.name(*args)`` to ``wrapper(original, *args)`` on this thread for the block.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> with scoped_method(layer, "forward", lambda original, x: original(x) * 0):
        ...     bool((layer(torch.ones(1, 2)) == 0).all())
        True
        >>> "forward" in layer.__dict__
        False
    """
    key = (id(obj), name)
    with _LOCK:
        dispatcher = _INSTALLED.get(key)
        if dispatcher is None:
            dispatcher = _INSTALLED[key] = _Dispatcher(obj, name)
            obj.__dict__[name] = dispatcher
        dispatcher.users += 1
    wrappers = _wrappers()
    previous = wrappers.get(id(dispatcher))
    wrappers[id(dispatcher)] = wrapper
    try:
        yield
    finally:
        if previous is None:
            wrappers.pop(id(dispatcher), None)
        else:
            wrappers[id(dispatcher)] = previous
        with _LOCK:
            dispatcher.users -= 1
            if dispatcher.users == 0:
                dispatcher.restore()
                del _INSTALLED[key]
