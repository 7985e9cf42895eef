"""Files that cannot turn on you: checkpoints and payloads hold only tensors and plain
types, and load with ``torch.load(weights_only=True)``, never with a full unpickle.

A full unpickle runs whatever a crafted file asks for (``__reduce__``). ``weights_only``
refuses every global outside torch's allow-list, on torch 2.0 (the platform) through
today. :func:`plain` converts what the product writes (numpy scalars and arrays) to
allowed types at save time, and refuses anything else, so every file it writes loads
safely; :func:`safe_load` loads with ``weights_only=True`` and turns a refusal into an
error that names the file and says what to do. There is no fallback.

Standard library, numpy and torch only: this module ships inside the bundle.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Union

import numpy as np
import torch


class UnsafeFileError(ValueError):
    """A file needs more than ``weights_only=True`` allows (or cannot be read); never unpickled."""


def plain(obj: Any, where: str = "payload") -> Any:
    """``obj`` with numpy scalars/arrays converted (arrays -> tensors, scalars -> Python
    numbers); dicts, lists, tuples, str, int, float, bool, None and tensors kept.

    Raises ``TypeError`` naming the key path for any other type (it would need a full
    unpickle to load).
    """
    if isinstance(obj, np.generic):  # first: np.float64 is also a float, but pickles as a numpy object
        return obj.item()
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, str):  # str subclasses (str enums) pickle as their class: keep the text
        return str.__str__(obj)
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):  # IntEnum and friends
        return type(obj).__mro__[[c in (int, float) for c in type(obj).__mro__].index(True)](obj)
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, dict):
        return {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which would need a full "
                    "unpickle to load; store tensors and plain types (dict, list, str, int, float, bool, None)")


Source = Union[str, "os.PathLike[str]", Any]


def safe_load(source: Source, what: str = "file", fix: str = "rebuild it with the current tools") -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU; a file that needs more (a
    crafted pickle, or an old file holding numpy or custom objects) is refused with a
    message naming it. ``source`` is a path or a binary file object."""
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", f"<embedded {what}>")
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(name):
        raise FileNotFoundError(f"{what} {name} not found")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - never fall back to a full unpickle
        text = str(exc).strip().splitlines()
        detail = text[0] if text else type(exc).__name__
        for line in text:  # torch names the refused global on one of its lines
            if "GLOBAL" in line or "Unsupported" in line or "global" in line:
                detail = line.strip()
                break
        raise UnsafeFileError(
            f"refused to load {what} {name}: it cannot be read with torch.load(weights_only=True) ({detail}). "
            f"It holds something other than tensors and plain types, or is damaged; it was not unpickled. "
            f"If you made it with an older version of these tools, {fix}; never load files from an unknown source."
        ) from None
