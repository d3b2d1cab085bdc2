from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmplug.core.config import load_config
from lmplug.core.keys import FINGERPRINT_BYTES, ChunkKey, KeyMaker
from lmplug.errors import InvalidTokensError
from lmplug.testing import make_config

CHUNK = 8


def maker(**overrides: Any) -> KeyMaker:
    config = make_config(chunk_size=CHUNK)
    model = dict(config["model"], **overrides.pop("model", {}))
    config.update(overrides, model=model)
    return KeyMaker(load_config(config, environ={}))


token_lists = st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=10 * CHUNK)


@given(prefix_chunks=st.integers(0, 5), tails=st.tuples(token_lists, token_lists), data=st.data())
def test_shared_prefix_of_m_chunks_shares_exactly_m_keys(prefix_chunks: int, tails: Any, data: Any) -> None:
    prefix = data.draw(st.lists(st.integers(0, 50_000), min_size=prefix_chunks * CHUNK, max_size=prefix_chunks * CHUNK))
    first, second = prefix + tails[0], prefix + tails[1]
    # Make the chunk right after the shared prefix differ, when both have one.
    if len(first) >= len(prefix) + CHUNK and len(second) >= len(prefix) + CHUNK:
        second[len(prefix)] = (first[len(prefix)] + 1) % 2**31
    keys = maker()
    a, b = keys.keys(first), keys.keys(second)
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    both_full = min(len(first), len(second)) // CHUNK
    expected = prefix_chunks if both_full > prefix_chunks else both_full
    assert shared == expected


@given(tokens=st.lists(st.integers(0, 50_000), min_size=CHUNK, max_size=8 * CHUNK), data=st.data())
def test_changing_a_token_in_chunk_j_changes_keys_from_j_on_only(tokens: list[int], data: Any) -> None:
    full = len(tokens) // CHUNK
    position = data.draw(st.integers(0, full * CHUNK - 1))
    changed = list(tokens)
    changed[position] = tokens[position] + 1
    keys = maker()
    before, after = keys.keys(tokens), keys.keys(changed)
    j = position // CHUNK
    assert before[:j] == after[:j]
    assert all(x != y for x, y in zip(before[j:], after[j:], strict=True))


@settings(max_examples=50)
@given(tokens=token_lists)
def test_keys_depend_only_on_values_not_container(tokens: list[int]) -> None:
    keys = maker()
    expected = keys.keys(tokens)
    assert keys.keys(np.array(tokens, dtype=np.int64)) == expected
    assert keys.keys(torch.tensor(tokens, dtype=torch.int64)) == expected
    assert keys.keys(np.array(tokens, dtype="<i4")) == expected
    assert keys.keys(tuple(tokens)) == expected


def test_only_full_chunks_unless_partial_chunks_are_saved() -> None:
    tokens = list(range(3 * CHUNK + 3))
    assert len(maker().keys(tokens)) == 3
    partial = maker(save_partial_chunks=True).keys(tokens)
    assert len(partial) == 4
    assert partial[:3] == maker().keys(tokens)


def test_limit_stops_early() -> None:
    tokens = list(range(5 * CHUNK))
    assert maker().keys(tokens, limit=2) == maker().keys(tokens)[:2]


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"name": "other-model"}},
        {"model": {"num_layers": 3}},
        {"model": {"num_kv_heads": 1}},
        {"model": {"head_size": 2}},
        {"model": {"dtype": "float16"}},
        {"world_size": 2, "rank": 1},
        {"namespace": "tenant-b"},
        {"hash_algorithm": "xxh3_128"},
    ],
)
def test_anything_that_makes_kv_incompatible_changes_every_key(change: dict[str, Any]) -> None:
    tokens = list(range(4 * CHUNK))
    base, other = maker().keys(tokens), maker(**change).keys(tokens)
    assert not set(base) & set(other)
    assert base[0][:FINGERPRINT_BYTES] != other[0][:FINGERPRINT_BYTES]  # grouped apart


def test_key_shape() -> None:
    key = maker().keys(list(range(CHUNK)))[0]
    assert isinstance(key, ChunkKey)
    assert len(key) == 24
    assert key[:FINGERPRINT_BYTES] == maker().fingerprint
    assert str(key) == key.hex()


def test_keys_match_across_processes() -> None:
    tokens = list(range(1000, 1000 + 6 * CHUNK))
    config = make_config(chunk_size=CHUNK, namespace="x")
    script = (
        "import sys, json; from lmplug.core.keys import KeyMaker; from lmplug.core.config import load_config;"
        "cfg = json.loads(sys.argv[1]); toks = json.loads(sys.argv[2]);"
        "print(','.join(k.hex() for k in KeyMaker(load_config(cfg, environ={})).keys(toks)))"
    )
    import json

    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, json.dumps(config), json.dumps(tokens)],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    local = ",".join(k.hex() for k in KeyMaker(load_config(config, environ={})).keys(tokens))
    assert outputs == {local}


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1, -2, 3], r"\[0, 2\*\*31\)"),
        ([1, 2**31], r"\[0, 2\*\*31\)"),
        ([[1, 2], [3, 4]], "one-dimensional"),
        ([1.5, 2.0], "must be integers"),
        (np.array([-1], dtype="<i4"), r"\[0, 2\*\*31\)"),
        (["a", "b"], "must be integers"),
        ([1, 2**70], "must be integers"),
        (np.array([2**31], dtype=np.uint32), r"\[0, 2\*\*31\)"),
        (list(range(-1, 100)), r"\[0, 2\*\*31\)"),
        (torch.tensor([[1]]), "one-dimensional"),
    ],
)
def test_bad_tokens_are_rejected(tokens: object, message: str) -> None:
    with pytest.raises(InvalidTokensError, match=message):
        maker().keys(tokens)


def test_a_key_domain_never_shares_a_key_with_prefix_keys_or_another_domain() -> None:
    base = maker()
    segments, other = base.in_domain("blend/segment"), base.in_domain("other")
    tokens = list(range(3 * CHUNK + 3))
    prefix, mine, theirs = base.keys(tokens), segments.keys(tokens), other.keys(tokens)
    assert len(mine) == 4  # a domain keys the trailing partial chunk even when the cache does not
    assert not {*prefix} & {*mine}
    assert not {*mine} & {*theirs}
    # Same compatibility fingerprint: tiers and peers treat domain keys like any other.
    assert {key[:FINGERPRINT_BYTES] for key in [*prefix, *mine, *theirs]} == {base.fingerprint}
    # A domain's keys name the sequence alone: the same tokens anywhere get the same keys.
    assert segments.keys(tokens) == mine
    assert base.in_domain("blend/segment") is segments
    assert segments.in_domain(None) is base
    assert segments.in_domain("other") is other


def test_a_domain_is_named_by_printable_text() -> None:
    with pytest.raises(ValueError, match="key domain"):
        maker().in_domain("")
    with pytest.raises(ValueError, match="key domain"):
        maker().in_domain("a\nb")


def test_domain_keys_are_stable_across_processes() -> None:
    code = (
        "from lmplug.core.config import load_config; from lmplug.core.keys import KeyMaker;"
        "from lmplug.testing import make_config;"
        f"m = KeyMaker(load_config(make_config(chunk_size={CHUNK}), environ={{}})).in_domain('blend/segment');"
        f"print(m.keys(list(range({2 * CHUNK + 1})))[-1].hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == maker().in_domain("blend/segment").keys(list(range(2 * CHUNK + 1)))[-1].hex()
