"""Blocking file I/O of the disk tier: chunk files, atomic writes, O_DIRECT, the start-up scan.

Every function here blocks and runs in a worker thread (``anyio.to_thread.run_sync``).

A chunk file is ``<root>/<2 hex>/<key hex>.<tokens>.kv``: the 76-byte header of
:mod:`lmplug.core.serde` padded to one 4 KiB block, then the payload padded to whole
blocks, so that with O_DIRECT every transfer is block-aligned and the payload moves
straight between the file and aligned memory (the pool's chunks, a caller's aligned KV
buffer); memory that is not aligned goes through a per-thread staging area. A file is
written under a temporary name and renamed into place, so a crash never leaves a partial
file under a chunk's name; the payload checksum catches what a power loss might.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from lmplug import CorruptChunk
from lmplug.tierkit import HEADER, ChunkHeader, ChunkKey, KVLayout, parts_checksum, slice_parts

BLOCK = 4096
_ZEROS = bytes(BLOCK)
SUFFIX = ".kv"
KEY_HEX = 48
"""Hex digits of a chunk key in a file name (24-byte keys)."""
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


def address_of(view: memoryview) -> int:
    """Where a writable memoryview's bytes start in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if view.nbytes else 0


def _direct_ready(views: Sequence[memoryview], addresses: Sequence[int]) -> bool:
    """Whether O_DIRECT can move ``views`` (consecutive file bytes) as they are: each starts on a
    block boundary and all but the last are whole blocks (the last one's tail is staged)."""
    last = len(views) - 1
    return all(
        address % BLOCK == 0 and (index == last or view.nbytes % BLOCK == 0)
        for index, (view, address) in enumerate(zip(views, addresses, strict=True))
    )


def _iovec(
    views: list[memoryview], nbytes: int, ready: bool, direct: bool, staging: _Staging
) -> tuple[list[memoryview], list[memoryview], memoryview]:
    """How one ``preadv``/``pwritev`` moves ``views`` (``nbytes`` consecutive file bytes).

    Returns ``(buffers, staged, area)``: the buffers of the system call (the views themselves
    where they can be used, staging memory in whole blocks otherwise), and the views (or the
    last one's tail) whose bytes travel through ``area``, a staging region, back to back. A
    reader copies ``area`` into ``staged`` after the call, a writer the other way before it.
    """
    if not direct:
        return views, [], staging.view(BLOCK, 0)
    if not ready:
        return [staging.view(BLOCK, round_up(nbytes))], views, staging.view(BLOCK, nbytes)
    last = views[-1]
    main = last.nbytes - last.nbytes % BLOCK
    if main == last.nbytes:
        return views, [], staging.view(BLOCK, 0)
    buffers = views[:-1] + ([last[:main]] if main else []) + [staging.view(BLOCK, BLOCK)]
    return buffers, [last[main:]], staging.view(BLOCK, last.nbytes - main)


def _staging_for(nbytes: int, ready: bool, direct: bool) -> _Staging:
    return _Staging.of(BLOCK + (round_up(nbytes) if direct and not ready else BLOCK))


def write_chunk_file(
    path: Path, header: ChunkHeader, payload: memoryview, address: int, *, direct: bool, fsync: bool
) -> None:
    """Write one chunk file atomically (temporary name, then rename)."""
    nbytes = payload.nbytes
    ready = _direct_ready([payload], [address])
    staging = _staging_for(nbytes, ready, direct)
    header_block = staging.view(0, BLOCK)
    packed = header.pack()
    header_block[: len(packed)] = packed
    header_block[len(packed) :] = _ZEROS[: BLOCK - len(packed)]  # padding is zeros, whatever was read here before
    buffers, staged, area = _iovec([payload], nbytes, ready, direct, staging)
    offset = 0
    for view in staged:
        area[offset : offset + view.nbytes] = view
        offset += view.nbytes
    if staged:  # the staged blocks' padding is zeros too
        pad = staging.view(BLOCK + offset, round_up(offset) - offset)
        pad[:] = _ZEROS[: pad.nbytes]
    pad_bytes = round_up(nbytes) - nbytes
    if not direct and pad_bytes:
        buffers.append(memoryview(_ZEROS)[:pad_bytes])
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


def read_chunk_part(
    path: Path, payload: Sequence[memoryview], size: int, start: int, end: int, *, direct: bool
) -> bytes:
    """Read payload bytes ``[start, end)`` of a chunk file into ``payload``.

    ``payload`` is the memory of the chunk's ``size`` payload bytes, in order, as one or more
    writable views (a chunk's own memory, or the per-layer rows of a caller's KV buffer): with
    O_DIRECT the bytes go straight into it where it is block-aligned and through this
    thread's staging memory where it is not. The part that starts at 0 also reads the header
    block, checks the file's size, and returns the header's bytes (verify them with
    :func:`verify_chunk` once every part is in); other parts return ``b""``. ``start`` is a
    multiple of the 4 KiB block.
    """
    part = slice_parts(payload, start, end)
    nbytes = end - start
    ready = direct and _direct_ready(part, [address_of(view) for view in part])
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    staging = _staging_for(nbytes, ready, direct)
    try:
        buffers, staged, area = _iovec(part, nbytes, ready, direct, staging)
        if start == 0:
            on_disk = os.fstat(fd).st_size
            if on_disk != file_size(size):
                raise CorruptChunk(f"{path.name}: {on_disk} bytes on disk, {file_size(size)} expected")
            buffers.insert(0, staging.view(0, BLOCK))
            expected = BLOCK + nbytes
        else:
            expected = nbytes
        read = _transfer_all(fd, buffers, write=False, offset=0 if start == 0 else BLOCK + start)
        if read < expected:
            raise CorruptChunk(f"{path.name}: read {read} bytes, {expected} expected (truncated)")
        source = address_of(area) if staged else 0
        for view in staged:
            ctypes.memmove(address_of(view), source, view.nbytes)  # a plain memcpy, without the GIL
            source += view.nbytes
        return bytes(staging.view(0, HEADER.size)) if start == 0 else b""
    finally:
        os.close(fd)


def verify_chunk(
    path: Path, header: bytes, key: ChunkKey, layout: KVLayout, tokens: int, payload: Sequence[memoryview]
) -> None:
    """Raise :class:`CorruptChunk` unless ``header`` and ``payload`` (its views in order) are ``key``'s KV."""
    parsed = ChunkHeader.unpack(header)
    parsed.expect(key, layout, tokens)
    if parts_checksum(payload) != parsed.checksum:
        raise CorruptChunk(f"{path.name}: payload checksum mismatch")


def read_chunk_file(
    path: Path, key: ChunkKey, layout: KVLayout, tokens: int, payload: memoryview, *, direct: bool
) -> None:
    """Read one chunk file into ``payload`` and verify it; :class:`CorruptChunk` says what is wrong."""
    header = read_chunk_part(path, [payload], payload.nbytes, 0, payload.nbytes, direct=direct)
    verify_chunk(path, header, key, layout, tokens, [payload])


def scan(root: Path, bytes_per_token: int) -> tuple[list[ChunkKey], list[int]]:
    """The key and token count of every chunk file under ``root``, least recently used first.

    Only names and ``stat`` are read, no file is opened; files come in the order of their
    modification times. Temporary files left by a crash, files whose size does not match
    their name (truncated), and strays are removed. A name is ``<48 hex>.<tokens>.kv``; its
    token count is parsed once per distinct value (nearly every file holds a full chunk), and
    per file only plain lists of ints and keys are kept (no tuple for the garbage collector
    to walk).
    """
    times: list[int] = []
    keys: list[ChunkKey] = []
    sizes: list[int] = []
    counts: dict[str, tuple[int, int]] = {}  # "<tokens>" -> (tokens, expected file size)
    fromhex = bytes.fromhex
    suffix = len(SUFFIX)
    for shard in os.scandir(root):
        if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(shard.path):
            name = entry.name
            known = None
            # "<key hex>.<tokens>.kv": at least one digit of tokens
            if len(name) >= KEY_HEX + 2 + suffix and name[KEY_HEX] == "." and name.endswith(SUFFIX):
                text = name[KEY_HEX + 1 : -suffix]
                known = counts.get(text)
                if known is None and text.isdigit():
                    tokens = int(text)
                    known = counts[text] = (tokens, file_size(tokens * bytes_per_token))
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            try:
                if known is None or info.st_size != known[1] or not stat.S_ISREG(info.st_mode):
                    raise ValueError(name)
                keys.append(ChunkKey(fromhex(name[:KEY_HEX])))
            except ValueError:  # a stray, a crash's temporary file, or a truncated chunk file
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            times.append(info.st_mtime_ns)
            sizes.append(known[0])
    order = sorted(range(len(keys)), key=times.__getitem__)
    return [keys[i] for i in order], [sizes[i] for i in order]


def remove_files(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
