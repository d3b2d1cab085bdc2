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
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmplug import ChunkKey, CorruptChunk, KVLayout
from lmplug.core.serde import ChunkHeader, payload_checksum

BLOCK = 4096
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


def _transfer_all(fd: int, buffers: list[memoryview], write: bool) -> int:
    """pwritev/preadv the buffers back to back from offset 0, resuming after short transfers."""
    offset = 0
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
    return offset


@dataclass(slots=True)
class _Staging:
    """Aligned scratch memory for the header block, the payload tail, or a whole payload."""

    memory: mmap.mmap

    @classmethod
    def of(cls, nbytes: int) -> _Staging:
        return cls(mmap.mmap(-1, max(nbytes, BLOCK)))

    def view(self, start: int, length: int) -> memoryview:
        return memoryview(self.memory)[start : start + length]

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps later
            self.memory.close()


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
    try:
        header_block = staging.view(0, BLOCK)
        packed = header.pack()
        header_block[: len(packed)] = packed
        buffers, tail = _payload_iovec(payload, address, direct, staging)
        if direct and tail < nbytes:
            staging.view(BLOCK, nbytes - tail)[:] = payload[tail:]
        pad = round_up(nbytes) - nbytes
        if not direct and pad:
            buffers.append(memoryview(bytes(pad)))
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
    finally:
        staging.close()


def read_chunk_file(
    path: Path, key: ChunkKey, layout: KVLayout, tokens: int, payload: memoryview, address: int, *, direct: bool
) -> None:
    """Read one chunk file into ``payload`` and verify it; :class:`CorruptChunk` says what is wrong."""
    nbytes = payload.nbytes
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    staging = _Staging.of(BLOCK + (round_up(nbytes) if direct and address % BLOCK else BLOCK))
    try:
        size = os.fstat(fd).st_size
        if size != file_size(nbytes):
            raise CorruptChunk(f"{path.name}: {size} bytes on disk, {file_size(nbytes)} expected (truncated?)")
        header_block = staging.view(0, BLOCK)
        buffers, tail = _payload_iovec(payload, address, direct, staging)
        read = _transfer_all(fd, [header_block, *buffers], write=False)
        if read < BLOCK + nbytes:
            raise CorruptChunk(f"{path.name}: read {read} bytes, {BLOCK + nbytes} expected (truncated)")
        header = ChunkHeader.unpack(header_block)
        header.expect(key, layout, tokens)
        if tail < nbytes:
            payload[tail:] = staging.view(BLOCK, nbytes - tail)
        if payload_checksum(payload) != header.checksum:
            raise CorruptChunk(f"{path.name}: payload checksum mismatch")
    finally:
        os.close(fd)
        staging.close()


@dataclass(frozen=True, slots=True)
class FoundChunk:
    key: ChunkKey
    tokens: int
    size: int
    mtime_ns: int
    path: Path


def _parse(name: str) -> tuple[ChunkKey, int] | None:
    if not name.endswith(SUFFIX):
        return None
    stem = name[: -len(SUFFIX)]
    digest, _, tokens = stem.partition(".")
    if len(digest) != 48 or not tokens.isdigit():
        return None
    try:
        return ChunkKey(bytes.fromhex(digest)), int(tokens)
    except ValueError:
        return None


def scan(root: Path, bytes_per_token: int) -> Iterator[FoundChunk]:
    """Every chunk file under ``root``; removes temporary files left by a crash, and strays."""
    for shard in sorted(os.scandir(root), key=lambda entry: entry.name):
        if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
            continue
        for entry in os.scandir(shard.path):
            parsed = _parse(entry.name)
            if parsed is None or not entry.is_file(follow_symlinks=False):
                # A temporary file from a crashed write, or something that is not ours to serve.
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            key, tokens = parsed
            stat = entry.stat(follow_symlinks=False)
            if stat.st_size != file_size(tokens * bytes_per_token):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            yield FoundChunk(key, tokens, stat.st_size, stat.st_mtime_ns, Path(entry.path))


def remove_files(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
