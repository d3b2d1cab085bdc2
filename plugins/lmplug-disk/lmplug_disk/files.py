"""Blocking file I/O of the disk tier: chunk files, atomic writes, O_DIRECT, the start-up scan.

Every function here blocks and runs in a worker thread (``anyio.to_thread.run_sync``).

A chunk file is ``<root>/<2 hex>/<key hex>.<tokens>.kv``: the 76-byte header of
:mod:`lmplug.core.serde` padded to one 4 KiB block, then the payload padded to whole
blocks, so that with O_DIRECT every transfer is block-aligned and the payload moves
straight between the file and the chunk's pool memory. A file is written under a
temporary name and renamed into place, so a crash never leaves a partial file under a
chunk's name; the payload checksum catches what a power loss might.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from lmplug import ChunkKey, CorruptChunk, KVLayout
from lmplug.core.serde import HEADER, ChunkHeader, payload_checksum

BLOCK = 4096
_ZEROS = bytes(BLOCK)
SUFFIX = ".kv"
TEMP_SUFFIX = ".tmp"


def round_up(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


def file_size(payload_bytes: int) -> int:
    """Bytes on disk of a chunk file whose payload is ``payload_bytes``."""
    return BLOCK + round_up(payload_bytes)


def chunk_path(root: Path, key: ChunkKey, tokens: int) -> Path:
    digest = key.hex()
    return root / digest[-2:] / f"{digest}.{tokens}{SUFFIX}"


def probe_direct_io(root: Path) -> bool:
    """Whether files under ``root`` accept O_DIRECT writes and reads of aligned blocks."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = root / f".probe-{os.getpid()}-{threading.get_ident()}"
    buffer = mmap.mmap(-1, BLOCK)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        try:
            return os.pwrite(fd, buffer, 0) == BLOCK and os.preadv(fd, [buffer], 0) == BLOCK
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        buffer.close()
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()


def _transfer_all(fd: int, buffers: list[memoryview], write: bool, offset: int = 0) -> int:
    """pwritev/preadv the buffers back to back from ``offset``; bytes moved (resumes short transfers)."""
    first = offset
    pending = [view for view in buffers if view.nbytes]
    while pending:
        done = os.pwritev(fd, pending, offset) if write else os.preadv(fd, pending, offset)
        if done == 0:
            break  # end of file on a read
        offset += done
        while pending and done >= pending[0].nbytes:
            done -= pending[0].nbytes
            pending.pop(0)
        if pending and done:
            pending[0] = pending[0][done:]
    return offset - first


class _Staging:
    """Page-aligned scratch memory for the header block, the payload tail, or a whole payload.

    One per I/O thread, kept and grown as needed: a fresh mapping costs page faults (about
    1 GB/s here), slower than the disk it stages for.
    """

    _local = threading.local()

    def __init__(self, nbytes: int) -> None:
        self.memory = mmap.mmap(-1, nbytes)
        self.view_all = memoryview(self.memory)

    @classmethod
    def of(cls, nbytes: int) -> _Staging:
        staging: _Staging | None = getattr(cls._local, "staging", None)
        if staging is None or len(staging.memory) < nbytes:
            staging = cls(max(nbytes, 2 * BLOCK))
            cls._local.staging = staging
        return staging

    def view(self, start: int, length: int) -> memoryview:
        return self.view_all[start : start + length]


def _payload_iovec(payload: memoryview, address: int, direct: bool, staging: _Staging) -> tuple[list[memoryview], int]:
    """Buffers that cover the payload in whole blocks, and where the unaligned tail was staged.

    Returns ``(buffers, tail_offset)``; bytes from ``tail_offset`` on travel through the
    staging area (from ``BLOCK`` on) rather than straight from the payload.
    """
    nbytes = payload.nbytes
    if not direct:
        return [payload], nbytes
    if address % BLOCK:
        return [staging.view(BLOCK, round_up(nbytes))], 0
    main = nbytes - nbytes % BLOCK
    if main == nbytes:
        return [payload], nbytes
    return [payload[:main], staging.view(BLOCK, BLOCK)], main


def write_chunk_file(
    path: Path, header: ChunkHeader, payload: memoryview, address: int, *, direct: bool, fsync: bool
) -> None:
    """Write one chunk file atomically (temporary name, then rename)."""
    nbytes = payload.nbytes
    staging = _Staging.of(BLOCK + (round_up(nbytes) if direct and address % BLOCK else BLOCK))
    header_block = staging.view(0, BLOCK)
    packed = header.pack()
    header_block[: len(packed)] = packed
    header_block[len(packed) :] = _ZEROS[: BLOCK - len(packed)]  # padding is zeros, whatever was read here before
    buffers, tail = _payload_iovec(payload, address, direct, staging)
    if direct and tail < nbytes:
        staged = round_up(nbytes - tail)
        staging.view(BLOCK, nbytes - tail)[:] = payload[tail:]
        staging.view(BLOCK + nbytes - tail, staged - (nbytes - tail))[:] = _ZEROS[: staged - (nbytes - tail)]
    pad = round_up(nbytes) - nbytes
    if not direct and pad:
        buffers.append(memoryview(_ZEROS)[:pad])
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}{TEMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    fd = os.open(temporary, flags, 0o644)
    try:
        written = _transfer_all(fd, [header_block, *buffers], write=True)
        if written != file_size(nbytes):
            raise OSError(errno.EIO, f"short write: {written} of {file_size(nbytes)} bytes", str(temporary))
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    os.close(fd)
    os.rename(temporary, path)
    if fsync:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


SEGMENT = 8 * 2**20
"""Payload bytes one reader moves at a time: large chunks are read by several threads at once."""


def read_chunk_part(path: Path, payload: memoryview, start: int, end: int, address: int, *, direct: bool) -> bytes:
    """Read payload bytes ``[start, end)`` of a chunk file into ``payload[start:end]``.

    The part that starts at 0 also reads the header block, checks the file's size, and
    returns the header's bytes (verify them with :func:`verify_chunk` once every part is
    in); other parts return ``b""``. ``start`` is a multiple of the 4 KiB block.
    """
    part = payload[start:end]
    nbytes = part.nbytes
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    staging = _Staging.of(BLOCK + (round_up(nbytes) if direct and address % BLOCK else BLOCK))
    try:
        buffers, tail = _payload_iovec(part, address + start, direct, staging)
        if start == 0:
            size = os.fstat(fd).st_size
            if size != file_size(payload.nbytes):
                raise CorruptChunk(f"{path.name}: {size} bytes on disk, {file_size(payload.nbytes)} expected")
            buffers.insert(0, staging.view(0, BLOCK))
            expected = BLOCK + nbytes
        else:
            expected = nbytes
        read = _transfer_all(fd, buffers, write=False, offset=0 if start == 0 else BLOCK + start)
        if read < expected:
            raise CorruptChunk(f"{path.name}: read {read} bytes, {expected} expected (truncated)")
        if tail < nbytes:
            part[tail:] = staging.view(BLOCK, nbytes - tail)
        return bytes(staging.view(0, HEADER.size)) if start == 0 else b""
    finally:
        os.close(fd)


def verify_chunk(path: Path, header: bytes, key: ChunkKey, layout: KVLayout, tokens: int, payload: memoryview) -> None:
    """Raise :class:`CorruptChunk` unless ``header`` and ``payload`` are ``key``'s KV."""
    parsed = ChunkHeader.unpack(header)
    parsed.expect(key, layout, tokens)
    if payload_checksum(payload) != parsed.checksum:
        raise CorruptChunk(f"{path.name}: payload checksum mismatch")


def read_chunk_file(
    path: Path, key: ChunkKey, layout: KVLayout, tokens: int, payload: memoryview, address: int, *, direct: bool
) -> None:
    """Read one chunk file into ``payload`` and verify it; :class:`CorruptChunk` says what is wrong."""
    header = read_chunk_part(path, payload, 0, payload.nbytes, address, direct=direct)
    verify_chunk(path, header, key, layout, tokens, payload)


def _parse(name: str) -> tuple[ChunkKey, int] | None:
    """``(key, tokens)`` from ``<48 hex>.<tokens>.kv``, or ``None`` for any other name."""
    if len(name) < 52 or name[48] != "." or not name.endswith(SUFFIX):
        return None
    tokens = name[49 : -len(SUFFIX)]
    if not tokens.isdigit():
        return None
    try:
        return ChunkKey(bytes.fromhex(name[:48])), int(tokens)
    except ValueError:
        return None


def scan(root: Path, bytes_per_token: int) -> list[tuple[int, ChunkKey, int]]:
    """``(mtime_ns, key, tokens)`` of every chunk file under ``root``, oldest first.

    Only names and ``stat`` are read, no file is opened. Temporary files left by a crash,
    files whose size does not match their name (truncated), and strays are removed.
    """
    found: list[tuple[int, ChunkKey, int]] = []
    append = found.append
    for shard in os.scandir(root):
        if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(shard.path):
            parsed = _parse(entry.name)
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (
                parsed is None
                or not stat.S_ISREG(info.st_mode)
                or info.st_size != file_size(parsed[1] * bytes_per_token)
            ):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            append((info.st_mtime_ns, parsed[0], parsed[1]))
    found.sort()
    return found


def remove_files(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
