"""Chunk keys: chained hashes over canonical token bytes.

Key ``i`` hashes key ``i-1``'s digest with chunk ``i``'s token ids as little-endian int32
bytes, so a key names the whole prefix up to the end of its chunk. The chain starts from
a digest of everything that makes KV compatible (model, KV geometry, world size, rank,
namespace, chunk size, hash algorithm), so incompatible KV can never share a key. Keys
are deterministic across processes and machines.

A *key domain* (:meth:`KeyMaker.in_domain`) is a second family of keys over the same KV: its
chain starts from a root that also names the domain, so its keys never equal a prefix key
(nor another domain's). CacheBlend keys a passage's KV in its own domain wherever the
passage appears in a prompt.
"""

from __future__ import annotations

import array as _array
import json
import sys
from collections.abc import Callable
from typing import Any

import blake3
import numpy as np
import torch
import xxhash

from lmplug.core.config import LmplugConfig
from lmplug.errors import InvalidInputError, InvalidTokensError

KEY_FORMAT_VERSION = 1
FINGERPRINT_BYTES = 8
DIGEST_BYTES = 16
_INT32_MAX = 2**31 - 1


class ChunkKey(bytes):
    """A 24-byte key: 8 bytes of compatibility fingerprint (model, layout, rank, chunk size,
    hash: :attr:`KeyMaker.fingerprint`), then a 16-byte chained digest.

    It is ``bytes`` so that it hashes and compares at C speed.
    """

    __slots__ = ()

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"ChunkKey({self.hex()})"


def _blake3_chain(previous: bytes, data: memoryview) -> bytes:
    hasher = blake3.blake3(previous)
    hasher.update(data)
    return hasher.digest(length=DIGEST_BYTES)


def _xxh3_chain(previous: bytes, data: memoryview) -> bytes:
    hasher = xxhash.xxh3_128(previous)
    hasher.update(data)
    return hasher.digest()


_CHAINS: dict[str, Callable[[bytes, memoryview], bytes]] = {"blake3": _blake3_chain, "xxh3_128": _xxh3_chain}


_LITTLE = sys.byteorder == "little"


def _from_ints(tokens: list[int] | tuple[int, ...]) -> np.ndarray | None:
    """int32 array from a list of ints at C speed, or ``None`` if it holds anything else."""
    try:
        packed = _array.array("i", tokens)  # refuses floats and values outside int32
    except (TypeError, OverflowError):
        return None
    array = np.frombuffer(packed, dtype=np.int32)
    return array if _LITTLE else array.astype("<i4")


def canonical_tokens(tokens: object) -> np.ndarray:
    """Return token ids as a contiguous little-endian int32 array (the canonical hash input).

    Raises :class:`InvalidTokensError` unless ``tokens`` is a 1-D sequence of integers in
    ``[0, 2**31)``.
    """
    if isinstance(tokens, list | tuple) and (array := _from_ints(tokens)) is not None:
        # Short prompts: Python's min beats a numpy reduction's fixed cost.
        if array.size and (min(tokens) if array.size < 64 else int(np.minimum.reduce(array))) < 0:
            raise InvalidTokensError("token ids must lie in [0, 2**31)")
        return array
    if isinstance(tokens, torch.Tensor):
        array = tokens.detach().cpu().numpy()
    elif isinstance(tokens, np.ndarray):
        array = tokens
    else:
        try:
            array = np.asarray(tokens)
        except (TypeError, ValueError) as exc:
            raise InvalidTokensError(f"token ids must be a sequence of integers: {exc}") from None
    if array.ndim != 1:
        raise InvalidTokensError(f"token ids must be one-dimensional, got shape {list(array.shape)}")
    if not array.size:
        return np.empty(0, dtype="<i4")
    if array.dtype.kind not in "iu":
        raise InvalidTokensError(f"token ids must be integers, got dtype {array.dtype}")
    wide = array.dtype != np.dtype("<i4")
    if int(np.minimum.reduce(array)) < 0 or (wide and int(np.maximum.reduce(array)) > _INT32_MAX):
        raise InvalidTokensError("token ids must lie in [0, 2**31)")
    return np.ascontiguousarray(array.astype("<i4") if wide else array)


class KeyMaker:
    """Turns token sequences into chunk keys for one cache configuration."""

    def __init__(self, config: LmplugConfig, *, domain: str | None = None) -> None:
        self.chunk_size = config.chunk_size
        self.domain = domain
        # A domain's sequences are looked up whole, so their trailing partial chunk is always keyed.
        self.save_partial_chunks = config.save_partial_chunks or domain is not None
        self._config = config
        self._chain = _CHAINS[config.hash_algorithm]
        identity: dict[str, Any] = {
            "format": KEY_FORMAT_VERSION,
            "model": config.model.name,
            "layers": config.model.num_layers,
            "kv_heads": config.model.num_kv_heads,
            "head_size": config.model.head_size,
            "dtype": config.model.dtype,
            "world_size": config.world_size,
            "rank": config.rank,
            "namespace": config.namespace,
            "chunk_size": config.chunk_size,
            "hash": config.hash_algorithm,
        }
        self.fingerprint = self._root_of(identity)[:FINGERPRINT_BYTES]
        if domain is not None:
            if not domain or not domain.isprintable():
                raise InvalidInputError(f"a key domain is a non-empty printable name, not {domain!r}")
            identity["domain"] = domain
        self.root = self._root_of(identity)
        self._domains: dict[str, KeyMaker] = {}
        self._base = self

    def _root_of(self, identity: dict[str, Any]) -> bytes:
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
        return self._chain(b"lmplug-key-root", memoryview(canonical))

    def in_domain(self, domain: str | None) -> KeyMaker:
        """The key maker of ``domain`` (``None``: the prefix keys). Its keys carry the same
        compatibility fingerprint; their chain starts from a root that names the domain, and a
        trailing partial chunk is always keyed."""
        if domain == self.domain:
            return self
        base = self if self.domain is None else self._base
        if domain is None:
            return base
        maker = base._domains.get(domain)
        if maker is None:
            maker = base._domains[domain] = KeyMaker(self._config, domain=domain)
            maker._base = base
        return maker

    def num_chunks(self, num_tokens: int) -> int:
        """How many keys ``keys()`` yields for a sequence of ``num_tokens`` tokens."""
        full, rest = divmod(num_tokens, self.chunk_size)
        return full + (1 if rest and self.save_partial_chunks else 0)

    def keys(self, tokens: object, limit: int | None = None) -> list[ChunkKey]:
        """Keys of the chunks of ``tokens`` (full chunks, plus a partial one if configured).

        ``limit`` stops after that many keys (the chain makes later keys depend on earlier ones,
        never the other way round).
        """
        return self.keys_of_canonical(canonical_tokens(tokens), limit)

    def key_after(self, previous: bytes, array: np.ndarray) -> ChunkKey:
        """The key of a chunk holding ``array`` (canonical tokens, possibly fewer than a full
        chunk) that follows the chunk keyed ``previous`` (``b""``: the first chunk). Equal to
        what :meth:`keys_of_canonical` yields for the same chunk in place."""
        digest = previous[FINGERPRINT_BYTES:] if previous else self.root
        return ChunkKey(self.fingerprint + self._chain(digest, array.data.cast("B")))

    def keys_of_canonical(self, array: np.ndarray, limit: int | None = None) -> list[ChunkKey]:
        """:meth:`keys` for an array that :func:`canonical_tokens` already produced."""
        count = self.num_chunks(array.size)
        if limit is not None:
            count = min(count, limit)
        data = array.data.cast("B")
        step = self.chunk_size * 4
        previous = self.root
        chain = self._chain
        fingerprint = self.fingerprint
        keys: list[ChunkKey] = []
        append = keys.append
        for index in range(count):
            previous = chain(previous, data[index * step : (index + 1) * step])
            append(ChunkKey(fingerprint + previous))
        return keys
