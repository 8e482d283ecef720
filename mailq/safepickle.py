"""Pickle that can only ever produce bounded trees of builtin scalars and containers.

Queue entries and list databases are pickles on a shared filesystem: anyone who can write there
could plant a file whose unpickling runs code (``__reduce__`` -> ``os.system``), never ends (a
"hash bomb": a few shared tuples used as dict keys, hashed 2^60 times) or builds something nothing
can write back (a list nested 2,000 deep: every re-pickle raises RecursionError).  So ``loads``
first walks the opcodes once (:func:`check`, linear in the size of the data, no object built) and
refuses, with :class:`UnsafePickle`:

* every opcode that needs a global or an extension (classes, functions, reduce tricks, buffers);
* nesting deeper than *max_depth* containers (default :data:`MAX_DEPTH`, far above what mailq writes);
* dict keys, set and frozenset members that are not scalars (None, bool, int, float, str, bytes) or
  a tuple/frozenset of scalars: hashing such a key costs time linear in its size, never more;
* a container changed after it was put into another one (only cycles need that; mailq writes none,
  and it is what would let depth grow behind the walk's back);
* memo indices past the memo's end (a huge index makes the C unpickler allocate a huge memo);
* truncated data, trailing garbage, an unbalanced stack.

Then the C unpickler builds the value (with ``find_class`` refusing every global as a second line).
Nothing an opcode builds is larger than the bytes that describe it, so the size of the data bounds
the size of the result; callers that read a file bound that size themselves.
"""
from __future__ import annotations

import io
import pickle
import struct
from typing import Any

PROTOCOL = pickle.HIGHEST_PROTOCOL
#: Deepest container nesting ``loads`` accepts: mailq's own formats nest fewer than 10 levels.
MAX_DEPTH = 100


class UnsafePickle(ValueError):
    """The data is not a pickle of plain builtin values (truncated, corrupt or hostile)."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # check() refuses every opcode that looks a global up; this is the second line.
        raise UnsafePickle(f"forbidden object {module}.{name} in pickle")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("persistent ids are not allowed")


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=PROTOCOL)


def loads(data: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Unpickle *data*, allowing only bounded trees of builtin scalars and containers."""
    check(data, max_depth=max_depth)
    return loads_checked(data)


def loads_checked(data: bytes) -> Any:
    """Unpickle *data* that passed :func:`check`: the C unpickler alone (``find_class`` still refuses
    every global).  Also for bytes this process checked or wrote with :func:`dumps` earlier and held
    in memory since (``ListStore.edit`` when ``list.pck`` did not change): what is read from disk
    afresh goes through :func:`loads`.
    """
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception as exc:  # anything check() let through and the C unpickler still refused
        raise UnsafePickle(f"unreadable pickle: {type(exc).__name__}: {exc}") from None


# -- the opcode walk ---------------------------------------------------------------------------
# Stack items: None for a scalar, else a container node [kind, depth, sealed, flat]:
#   kind   one of "l" (list), "d" (dict), "s" (set), "t" (tuple), "f" (frozenset)
#   depth  1 + the deepest container inside it
#   sealed True once it is inside another container (it may not change any more)
#   flat   True while it holds scalars only (a flat tuple/frozenset is a cheap dict key)
_KIND, _DEPTH, _SEALED, _FLAT = 0, 1, 2, 3

_U1 = struct.Struct("<B").unpack_from
_U2 = struct.Struct("<H").unpack_from
_U4 = struct.Struct("<I").unpack_from
_U8 = struct.Struct("<Q").unpack_from

#: Scalars with a fixed-size argument: opcode -> argument bytes.
_FIXED_SCALARS = {
    ord("N"): 0, 0x88: 0, 0x89: 0,              # NONE, NEWTRUE, NEWFALSE
    ord("J"): 4, ord("K"): 1, ord("M"): 2,      # BININT, BININT1, BININT2
    ord("G"): 8,                                # BINFLOAT
}
#: Scalars whose argument is a length prefix then that many bytes: opcode -> (prefix size, reader).
_COUNTED_SCALARS = {
    0x8c: (1, _U1), ord("X"): (4, _U4), 0x8d: (8, _U8),            # unicode: short, 4-byte, 8-byte
    ord("C"): (1, _U1), ord("B"): (4, _U4), 0x8e: (8, _U8),        # bytes: short, 4-byte, 8-byte
    0x96: (8, _U8),                                                # BYTEARRAY8
    ord("U"): (1, _U1), ord("T"): (4, _U4),                        # SHORT_BINSTRING, BINSTRING
    0x8a: (1, _U1), 0x8b: (4, _U4),                                # LONG1, LONG4
}
#: Scalars written as text up to a newline: INT, LONG, FLOAT, STRING, UNICODE.
_LINE_SCALARS = frozenset(map(ord, "ILFSV"))
_FORBIDDEN = {
    ord("c"): "GLOBAL", 0x93: "STACK_GLOBAL", ord("R"): "REDUCE", ord("b"): "BUILD", ord("i"): "INST",
    ord("o"): "OBJ", 0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", ord("P"): "PERSID", ord("Q"): "BINPERSID",
    0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4", 0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER",
}


def check(data: bytes, *, max_depth: int = MAX_DEPTH) -> None:
    """Walk the opcodes of *data* without building anything; UnsafePickle says what is refused."""
    try:
        _walk(memoryview(data).cast("B") if not isinstance(data, bytes) else data, max_depth)
    except UnsafePickle:
        raise
    except (IndexError, struct.error, ValueError) as exc:
        raise UnsafePickle(f"unreadable pickle: truncated or corrupt ({type(exc).__name__}: {exc})") from None


def _refuse(why: str, pos: int) -> UnsafePickle:
    return UnsafePickle(f"refused pickle: {why} (at byte {pos})")


def _walk(data: Any, max_depth: int) -> None:  # noqa: C901 - one opcode dispatch, kept flat for speed
    end = len(data)
    if not end:
        raise UnsafePickle("unreadable pickle: empty")
    stack: list[Any] = []
    marks: list[int] = []
    memo: list[Any] = []
    pos = 0
    fixed, counted, lines = _FIXED_SCALARS, _COUNTED_SCALARS, _LINE_SCALARS

    def add(parent: Any, child: Any, at: int) -> None:
        if parent is None:
            raise _refuse("adding items to a scalar", at)
        if parent[_SEALED]:
            raise _refuse("a container changed after it was put into another one (a cycle?)", at)
        if child is not None:
            if child is parent:
                raise _refuse("a container inside itself", at)
            child[_SEALED] = True
            parent[_FLAT] = False
            depth = child[_DEPTH] + 1
            if depth > parent[_DEPTH]:
                if depth > max_depth:
                    raise _refuse(f"nesting deeper than {max_depth} levels", at)
                parent[_DEPTH] = depth

    def key(item: Any, at: int) -> None:
        if item is not None and not (item[_KIND] in "tf" and item[_FLAT]):
            what = {"l": "list", "d": "dict", "s": "set", "t": "tuple of containers",
                    "f": "frozenset of containers"}[item[_KIND]]
            raise _refuse(f"a {what} as a dict key or set member (only scalars and flat tuples)", at)

    def pop_mark(at: int) -> list[Any]:
        if not marks:
            raise _refuse("no MARK on the stack", at)
        cut = marks.pop()
        items = stack[cut:]
        del stack[cut:]
        return items

    def new(kind: str, children: list[Any], at: int) -> list[Any]:
        node = [kind, 1, False, True]
        for child in children:
            if kind in "f":
                key(child, at)
            add(node, child, at)
        return node

    while True:
        if pos >= end:
            raise UnsafePickle("unreadable pickle: truncated (no STOP opcode)")
        op = data[pos]
        at = pos
        pos += 1
        if op in counted:
            size, read = counted[op]
            n = read(data, pos)[0]
            pos += size + n
            if pos > end:
                raise UnsafePickle("unreadable pickle: truncated string")
            stack.append(None)
        elif op == 0x94:                            # MEMOIZE
            if not stack:
                raise _refuse("MEMOIZE on an empty stack", at)
            memo.append(stack[-1])
        elif op in fixed:
            pos += fixed[op]
            stack.append(None)
        elif op == 0x71 or op == 0x72:              # BINPUT, LONG_BINPUT
            if op == 0x71:
                idx, pos = data[pos], pos + 1
            else:
                idx, pos = _U4(data, pos)[0], pos + 4
            _put(memo, stack, idx, at)
        elif op == 0x68 or op == 0x6a:              # BINGET, LONG_BINGET
            if op == 0x68:
                idx, pos = data[pos], pos + 1
            else:
                idx, pos = _U4(data, pos)[0], pos + 4
            if idx >= len(memo):
                raise _refuse(f"memo index {idx} was never stored", at)
            stack.append(memo[idx])
        elif op == 0x28:                            # MARK
            marks.append(len(stack))
        elif op == 0x65:                            # APPENDS
            items = pop_mark(at)
            parent = stack[-1]
            if parent is None or parent[_KIND] != "l":
                raise _refuse("APPENDS to something that is not a list", at)
            for item in items:
                add(parent, item, at)
        elif op == 0x75:                            # SETITEMS
            items = pop_mark(at)
            if len(items) % 2:
                raise _refuse("SETITEMS with an odd number of items", at)
            parent = stack[-1]
            if parent is None or parent[_KIND] != "d":
                raise _refuse("SETITEMS to something that is not a dict", at)
            for i in range(0, len(items), 2):
                key(items[i], at)
                add(parent, items[i], at)
                add(parent, items[i + 1], at)
        elif op == 0x5d or op == 0x7d or op == 0x8f or op == 0x29:   # EMPTY_LIST/DICT/SET/TUPLE
            stack.append(["l" if op == 0x5d else "d" if op == 0x7d else "s" if op == 0x8f else "t",
                          1, False, True])
        elif op == 0x61:                            # APPEND
            item = stack.pop()
            parent = stack[-1]
            if parent is None or parent[_KIND] != "l":
                raise _refuse("APPEND to something that is not a list", at)
            add(parent, item, at)
        elif op == 0x73:                            # SETITEM
            value = stack.pop()
            k = stack.pop()
            parent = stack[-1]
            if parent is None or parent[_KIND] != "d":
                raise _refuse("SETITEM to something that is not a dict", at)
            key(k, at)
            add(parent, k, at)
            add(parent, value, at)
        elif op == 0x90:                            # ADDITEMS
            items = pop_mark(at)
            parent = stack[-1]
            if parent is None or parent[_KIND] != "s":
                raise _refuse("ADDITEMS to something that is not a set", at)
            for item in items:
                key(item, at)
                add(parent, item, at)
        elif op in (0x85, 0x86, 0x87):              # TUPLE1, TUPLE2, TUPLE3
            n = op - 0x84
            if len(stack) < n:
                raise _refuse("TUPLE with too few items", at)
            items = stack[-n:]
            del stack[-n:]
            stack.append(new("t", items, at))
        elif op == 0x74 or op == 0x6c or op == 0x91:   # TUPLE, LIST, FROZENSET (from MARK)
            items = pop_mark(at)
            stack.append(new("t" if op == 0x74 else "l" if op == 0x6c else "f", items, at))
        elif op == 0x64:                            # DICT (from MARK)
            items = pop_mark(at)
            if len(items) % 2:
                raise _refuse("DICT with an odd number of items", at)
            node = ["d", 1, False, True]
            for i in range(0, len(items), 2):
                key(items[i], at)
                add(node, items[i], at)
                add(node, items[i + 1], at)
            stack.append(node)
        elif op == 0x80:                            # PROTO
            pos += 1
        elif op == 0x95:                            # FRAME
            pos += 8
        elif op == 0x2e:                            # STOP
            if len(stack) != 1 or marks:
                raise _refuse("STOP with an unbalanced stack", at)
            if pos != end:
                raise _refuse(f"{end - pos} byte(s) after STOP", pos)
            return
        elif op in lines:
            nl = data.index(b"\n", pos) if isinstance(data, bytes) else bytes(data[pos:]).index(b"\n")
            pos = nl + 1
            stack.append(None)
        elif op == 0x70 or op == 0x67:              # PUT, GET (text index)
            nl = data.index(b"\n", pos)
            idx = int(data[pos:nl])
            pos = nl + 1
            if op == 0x70:
                _put(memo, stack, idx, at)
            else:
                if not 0 <= idx < len(memo):
                    raise _refuse(f"memo index {idx} was never stored", at)
                stack.append(memo[idx])
        elif op == 0x30:                            # POP
            if stack and (not marks or marks[-1] < len(stack)):
                stack.pop()
            else:
                pop_mark(at)
        elif op == 0x31:                            # POP_MARK
            pop_mark(at)
        elif op == 0x32:                            # DUP
            stack.append(stack[-1])
        elif op in _FORBIDDEN:
            raise _refuse(f"forbidden object (opcode {_FORBIDDEN[op]} would look up or call code)", at)
        else:
            raise UnsafePickle(f"unreadable pickle: unknown opcode {op:#04x} at byte {at}")


def _put(memo: list[Any], stack: list[Any], idx: int, at: int) -> None:
    if not stack:
        raise _refuse("PUT on an empty stack", at)
    if idx > len(memo):
        raise _refuse(f"memo index {idx} leaves a gap (the memo has {len(memo)} items)", at)
    if idx == len(memo):
        memo.append(stack[-1])
    else:
        memo[idx] = stack[-1]
