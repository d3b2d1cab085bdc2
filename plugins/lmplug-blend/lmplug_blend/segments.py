"""Passages (segments) of a prompt, their keys, and the plan of a blend.

A passage's KV is cached under keys of its own key domain: the keys name the passage's tokens
alone, wherever it appears, and never equal a prefix key. The domain's name carries a
fingerprint of the model's RoPE, because the stored K is rotated back to position 0 with it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmplug_blend.config import PolicyConfig
from lmplug_blend.rope import RopeSpec, rotate

DOMAIN = "lmplug-blend/segment/v1"

Span = tuple[int, int]
"""``[start, end)`` of a passage in a prompt's tokens."""


def segment_domain(rope: RopeSpec) -> str:
    """The key domain of passage KV rotated to origin with ``rope``."""
    positions = torch.tensor([1, 7, 1000], dtype=torch.int64)
    cos, sin = rope.cos_sin(positions)
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{rope.head_size}/{rope.rotary_dim}/{int(rope.neox)}".encode())
    # Rounded angles: the same RoPE computed on another machine gives the same name.
    digest.update(np.round(torch.cat([cos, sin]).numpy().astype(np.float64), 5).tobytes())
    return f"{DOMAIN}/{digest.hexdigest()}"


MAX_SPANS = 1024
"""Most passages one request may name (each is looked up in the cache)."""


def check_spans(spans: Sequence[Sequence[int]], length: int) -> list[Span]:
    """``spans`` as sorted, non-overlapping ``(start, end)`` pairs inside ``length`` tokens, or ValueError."""
    if len(spans) > MAX_SPANS:
        raise ValueError(f"{len(spans)} passage spans; at most {MAX_SPANS} per request")
    checked: list[Span] = []
    for span in spans:
        if len(span) != 2 or not all(isinstance(value, int) for value in span):
            raise ValueError(f"a passage span is [start, end] in tokens, not {span!r}")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= length:
            raise ValueError(f"passage span [{start}, {end}) is not inside the prompt's {length} tokens")
        checked.append((start, end))
    checked.sort()
    for (_, end), (start, _) in itertools.pairwise(checked):
        if start < end:
            raise ValueError(f"passage spans overlap at token {start}")
    return checked


CONTEXT = ("The first passage ends here.", "The second passage starts here.")
"""Text around a separator when it is tokenized in context."""


def separator_ids(tokenizer: Any, separator: str) -> tuple[int, ...]:
    """The token ids ``separator`` becomes between two passages with ``tokenizer`` (a transformers
    tokenizer: ``encode`` and ``decode``), or ValueError when it has none that
    hold: tokens that merge with the text on either side (BPE tokenizers join a leading space or
    newline to the next word), or that do not decode back to ``separator``. A prompt's passages are
    found only where its separator is tokenized exactly so."""
    left, right = CONTEXT
    whole = tokenizer.encode(left + separator + right, add_special_tokens=False)
    before = tokenizer.encode(left, add_special_tokens=False)
    after = tokenizer.encode(right, add_special_tokens=False)
    if whole[: len(before)] != before or whole[len(whole) - len(after) :] != after:
        raise ValueError(f"separator {separator!r} merges with the text around it when tokenized; choose another")
    ids = whole[len(before) : len(whole) - len(after)]
    if not ids or tokenizer.decode(ids) != separator:
        raise ValueError(f"separator {separator!r} does not come back from its tokens {ids}")
    return tuple(ids)


def spans_between(tokens: np.ndarray, separator: Sequence[int]) -> list[Span]:
    """The passages between occurrences of the ``separator`` token ids (separators belong to no passage)."""
    size = len(separator)
    if not size or tokens.size < size:
        return [(0, int(tokens.size))] if tokens.size else []
    windows = np.lib.stride_tricks.sliding_window_view(tokens, size)
    hits = np.flatnonzero((windows == np.asarray(separator, dtype=tokens.dtype)).all(axis=1))
    spans: list[Span] = []
    begin = 0
    for hit in hits.tolist():
        if hit < begin:  # overlapping occurrence of a repetitive separator
            continue
        if hit > begin:
            spans.append((begin, hit))
        begin = hit + size
    if begin < tokens.size:
        spans.append((begin, int(tokens.size)))
    return spans


@dataclass(frozen=True, slots=True)
class BlendPlan:
    """What a request blends: the range ``[start, end)`` of the prompt; per token of the range,
    whether its KV is reused and its offset inside its passage; the passages used, each
    ``(start, end, hit)``: the passage's span and how many of its leading tokens are reused
    (from its own start, which may lie before the range's)."""

    start: int
    end: int
    reusable: np.ndarray
    offsets: np.ndarray
    passages: tuple[tuple[int, int, int], ...]

    @property
    def reused_tokens(self) -> int:
        return int(self.reusable.sum())


def plan_blend(
    length: int, start: int, spans: Sequence[Span], hits: Sequence[int], policy: PolicyConfig
) -> BlendPlan | None:
    """The blend of a ``length``-token prompt whose first ``start`` tokens are computed (or loaded as
    an exact prefix), given each passage's cached leading tokens ``hits``; None when it should not blend.

    The range ends where the last reused passage's cached tokens end, at most ``length - 1`` (the
    engine computes the last prompt token itself); every token in it that nothing covers is
    recomputed (a missed passage does not end the range). A passage that begins inside the exact
    prefix contributes the cached tokens it has after it.
    """
    used = [
        (s, e, min(hit, e - s))
        for (s, e), hit in zip(spans, hits, strict=True)
        if e - s >= policy.min_segment_tokens and s + min(hit, e - s) > start
    ]
    if not used:
        return None
    end = min(max(s + hit for s, _, hit in used), length - 1)
    if end <= start:
        return None
    reusable = np.zeros(end - start, dtype=bool)
    offsets = np.zeros(end - start, dtype=np.int64)
    passages = []
    for s, e, hit in used:
        first, stop = max(s, start), min(s + hit, end)
        if stop <= first:
            continue
        reusable[first - start : stop - start] = True
        offsets[first - start : stop - start] = np.arange(first - s, stop - s)
        passages.append((s, e, stop - s))
    reused = int(reusable.sum())
    if reused < max(policy.min_reused_tokens, 1) or (end - start - reused) > policy.max_forced_fraction * (end - start):
        return None
    return BlendPlan(start, end, reusable, offsets, tuple(passages))


def to_origin(keys: torch.Tensor, position: int, rope: RopeSpec) -> torch.Tensor:
    """K ``[layers, n, kv_heads, head_size]`` of a passage computed at ``position`` .. rotated as if at 0."""
    return moved(keys, -position, rope)


def moved(keys: torch.Tensor, delta: int, rope: RopeSpec) -> torch.Tensor:
    """K ``[layers, n, kv_heads, head_size]`` rotated by ``delta`` positions."""
    return rotate(keys, delta, rope)
