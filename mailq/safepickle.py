"""Pickle that can only ever produce builtin scalars and containers.

Queue entries and list databases are pickles on a shared filesystem: anyone who can write there
could plant a file whose unpickling runs code (``__reduce__`` -> ``os.system``).  ``loads`` refuses
every global lookup, so only None, bool, int, float, complex, str, bytes, bytearray, list, tuple,
dict, set and frozenset can come out.  A refused or broken pickle raises ``UnsafePickle``.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

PROTOCOL = pickle.HIGHEST_PROTOCOL


class UnsafePickle(ValueError):
    """The data is not a pickle of plain builtin values (truncated, corrupt or hostile)."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Sets and frozensets pickle without a global in protocol 4+; everything else that needs a
        # global (classes, functions, reduce tricks) is refused here.
        raise UnsafePickle(f"forbidden object {module}.{name} in pickle")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("persistent ids are not allowed")


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=PROTOCOL)


def loads(data: bytes) -> Any:
    """Unpickle *data*, allowing only builtin scalars and containers."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception as exc:  # truncated, garbage, wrong opcodes: all the same to a caller
        raise UnsafePickle(f"unreadable pickle: {type(exc).__name__}: {exc}") from None
