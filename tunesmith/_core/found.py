"""Facts about this process's machine found once (a kernel's signature, a small check run on a device) and
then read from a plain dict: compiled code reads a dict entry as a constant, where torch.compile would trace
straight through an lru_cache'd function, the check on the device included."""
from __future__ import annotations

from typing import Any, Callable

_FOUND: dict[tuple, Any] = {}


def found_once(key: tuple, find: Callable[[], Any]) -> Any:
    """`find()`, called the first time `key` is asked for; its answer every time after."""
    if key not in _FOUND:
        _FOUND[key] = find()
    return _FOUND[key]
