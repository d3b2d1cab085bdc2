"""Copies between an engine's KV tensor and chunks, one ``copy_`` per run of adjacent chunks.

Chunks that the pool carved one after another from the same storage form a run; a run is
viewed as one ``[n, 2, layers, tokens, hidden]`` tensor and copied to or from the KV
tensor's matching token range in a single strided copy, instead of one slice-and-copy per
chunk. Copies are non-blocking, so a CUDA source or destination overlaps with the caller;
the caller synchronises before the chunks are shared or the KV is used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmplug.core.memory import KVChunk

__all__ = ["KVBytes", "copy_from_chunks", "copy_into_chunks"]


def _runs(chunks: Sequence[KVChunk]) -> Iterator[tuple[int, int]]:
    """``(first, count)`` for each run of equal-sized chunks adjacent in one storage."""
    index = 0
    total = len(chunks)
    while index < total:
        first = chunks[index].tensor
        tokens = first.shape[2]
        end = first.data_ptr() + chunks[index].nbytes
        storage = -1  # looked up only when a neighbour might join the run
        count = 1
        while index + count < total:
            nxt = chunks[index + count]
            tensor = nxt.tensor
            if tensor.data_ptr() != end or tensor.shape[2] != tokens or not tensor.is_contiguous():
                break
            if storage == -1:
                storage = first.untyped_storage().data_ptr()
            if tensor.untyped_storage().data_ptr() != storage:
                break
            end += nxt.nbytes
            count += 1
        yield index, count
        index += count


def _run_view(chunk: torch.Tensor, count: int) -> torch.Tensor:
    two, layers, tokens, hidden = chunk.shape
    plane = tokens * hidden
    return chunk.as_strided(
        (count, two, layers, tokens, hidden), (two * layers * plane, layers * plane, plane, hidden, 1)
    )


def _token_view(kv: torch.Tensor, start: int, count: int, tokens: int) -> torch.Tensor:
    """``kv[:, :, start : start + count * tokens]`` as ``[count, 2, layers, tokens, hidden]``."""
    two, layers, _, hidden = kv.shape
    # Splitting one dimension is always a view, whatever the strides.
    return kv.narrow(2, start, count * tokens).view(two, layers, count, tokens, hidden).permute(2, 0, 1, 3, 4)


def copy_into_chunks(kv: torch.Tensor, start: int, chunks: Sequence[KVChunk]) -> None:
    """Fill ``chunks`` with the KV of consecutive token ranges beginning at token ``start``."""
    position = start
    for first, count in _runs(chunks):
        tensor = chunks[first].tensor
        tokens = tensor.shape[2]
        if count == 1:
            source = kv if position == 0 and kv.shape[2] == tokens else kv.narrow(2, position, tokens)
            tensor.copy_(source, non_blocking=True)
        else:
            _run_view(tensor, count).copy_(_token_view(kv, position, count, tokens), non_blocking=True)
        position += count * tokens


def copy_from_chunks(chunks: Sequence[KVChunk], out: torch.Tensor) -> int:
    """Write the chunks' KV one after another into ``out`` from token 0; how many tokens."""
    position = 0
    for first, count in _runs(chunks):
        tensor = chunks[first].tensor
        tokens = tensor.shape[2]
        if count == 1:
            target = out if position == 0 and out.shape[2] == tokens else out.narrow(2, position, tokens)
            target.copy_(tensor, non_blocking=True)
        else:
            _token_view(out, position, count, tokens).copy_(_run_view(tensor, count), non_blocking=True)
        position += count * tokens
    return position


class KVBytes:
    """A CPU KV tensor's memory as writable memoryviews, chunk by chunk, for readers that fill
    it from files and sockets (``preadv``, ``recv_into``) instead of copying chunks into it.

    A chunk's serialized payload is its KV ``[2, layers, tokens, hidden]`` in order: one row of
    ``tokens * hidden`` values per plane and layer. In a KV tensor (a view of a larger buffer,
    strided along the tokens) those rows lie at the plane and layer strides; :meth:`payload`
    returns them in payload order, adjacent rows merged into one view.
    """

    __slots__ = ("_hidden", "_itemsize", "_layers", "_memory", "_strides")

    def __init__(self, memory: memoryview, kv: torch.Tensor) -> None:
        self._memory = memory
        self._strides = (kv.stride(0), kv.stride(1), kv.stride(2))
        self._layers = int(kv.shape[1])
        self._hidden = int(kv.shape[3])
        self._itemsize = kv.element_size()

    @classmethod
    def of(cls, kv: torch.Tensor) -> KVBytes | None:
        """The byte views of ``kv``, or ``None`` when its memory cannot be written that way (not
        on the CPU, or a token's values not contiguous and tokens not one after another)."""
        if kv.device.type != "cpu" or kv.dim() != 4 or kv.numel() == 0 or kv.requires_grad:
            return None
        if kv.stride(3) != 1 or kv.stride(2) != kv.shape[3]:
            return None
        extent = 1 + sum((size - 1) * stride for size, stride in zip(kv.shape, kv.stride(), strict=True))
        flat = torch.as_strided(kv, (extent,), (1,))  # the span of storage that kv covers, as a 1-D view
        return cls(flat.view(torch.uint8).numpy().data.cast("B"), kv)

    def payload(self, start: int, tokens: int) -> list[memoryview]:
        """Views of the payload of the chunk of ``tokens`` tokens from token ``start``, in order."""
        plane, layer, token = (stride * self._itemsize for stride in self._strides)
        row = tokens * self._hidden * self._itemsize
        spans: list[list[int]] = []
        for p in range(2):
            for layer_index in range(self._layers):
                begin = p * plane + layer_index * layer + start * token
                if spans and spans[-1][1] == begin:
                    spans[-1][1] = begin + row
                else:
                    spans.append([begin, begin + row])
        memory = self._memory
        return [memory[begin:end] for begin, end in spans]
