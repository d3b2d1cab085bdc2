"""A RESP command packer that sends values without copying them.

redis-py with hiredis packs commands with ``hiredis.pack_command``, which copies every value
twice (``bytes(memoryview)``, then the packed buffer). :class:`Packer` instead emits large
values, and the parts of a :class:`Concat`, as pieces of their own that ``sendall`` sends
straight from chunk memory, back to back with no join.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import DataError

__all__ = ["PACKER", "Concat", "Packer"]

_PIECE = 16 * 1024
"""Arguments longer than this are sent as pieces of their own instead of copied into the command."""


class Concat(tuple[memoryview, ...]):
    """One value sent as its parts back to back (the server sees one string)."""

    __slots__ = ()


def _encode(arg: object) -> bytes | bytearray | memoryview:
    # What redis-py's Encoder accepts, without decoding or copying buffers.
    if isinstance(arg, bytes | bytearray | memoryview):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):
        raise DataError(f"invalid input of type bool ({arg!r}); convert to a bytes, string, int or float first")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise DataError(f"invalid input of type {type(arg).__name__}; convert to a bytes, string, int or float first")


class Packer:
    """RESP command packer that sends large values and :class:`Concat` parts as their own pieces."""

    def pack(self, *args: Any) -> list[bytes | bytearray | memoryview]:
        if isinstance(args[0], str):  # "CLUSTER SLOTS" and the like are several words
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        pieces: list[bytes | bytearray | memoryview] = []
        buffer = bytearray(b"*%d\r\n" % len(args))
        for arg in args:
            if isinstance(arg, Concat):
                buffer += b"$%d\r\n" % sum(part.nbytes for part in arg)
                pieces.append(bytes(buffer))
                pieces.extend(arg)
                buffer = bytearray(b"\r\n")
                continue
            value = _encode(arg)
            size = value.nbytes if isinstance(value, memoryview) else len(value)
            buffer += b"$%d\r\n" % size
            if size > _PIECE or isinstance(value, memoryview):
                pieces.append(bytes(buffer))
                pieces.append(value)
                buffer = bytearray(b"\r\n")
            else:
                buffer += value
                buffer += b"\r\n"
        pieces.append(bytes(buffer))
        return pieces


PACKER = Packer()
