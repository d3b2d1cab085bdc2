"""Passages, their key domain, and the plan of a blend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmplug_blend.config import PolicyConfig, SelectionConfig
from lmplug_blend.rope import RopeSpec, inverse_frequency_angles
from lmplug_blend.segments import DOMAIN, check_spans, plan_blend, segment_domain, spans_between
from lmplug_blend.select import budget, choose

POLICY = PolicyConfig(min_segment_tokens=4, min_reused_tokens=8, max_forced_fraction=0.5)


def test_a_missed_passage_is_recomputed_not_the_end_of_the_blend() -> None:
    # system [0, 10), passages [10, 40) hit, [40, 60) missed, [60, 90) half hit, question [90, 100)
    spans = [(10, 40), (40, 60), (60, 90)]
    plan = plan_blend(100, 0, spans, [30, 0, 15], POLICY)
    assert plan is not None
    assert (plan.start, plan.end) == (0, 75)
    assert plan.reusable.tolist() == [False] * 10 + [True] * 30 + [False] * 20 + [True] * 15
    assert plan.offsets[10:40].tolist() == list(range(30))
    assert plan.offsets[60:75].tolist() == list(range(15))
    assert plan.passages == ((10, 40, 30), (60, 90, 15))


def test_the_engine_computes_the_last_prompt_token() -> None:
    plan = plan_blend(50, 0, [(0, 50)], [50], POLICY)
    assert plan is not None
    assert plan.end == 49
    assert plan.reused_tokens == 49


def test_a_blend_starts_after_what_is_already_computed() -> None:
    plan = plan_blend(100, 20, [(0, 20), (20, 60)], [20, 40], POLICY)
    assert plan is not None
    assert (plan.start, plan.end) == (20, 60)
    assert plan.passages == ((20, 60, 40),)


def test_a_passage_that_begins_inside_the_exact_prefix_gives_the_rest() -> None:
    plan = plan_blend(100, 30, [(10, 60), (60, 90)], [50, 0], POLICY)
    assert plan is not None
    assert (plan.start, plan.end) == (30, 60)
    assert plan.reusable.all()
    assert plan.offsets.tolist() == list(range(20, 50))
    assert plan.passages == ((10, 60, 50),)


@pytest.mark.parametrize(
    ("spans", "hits", "why"),
    [
        ([(10, 40)], [0], "nothing cached"),
        ([(10, 13)], [3], "passage shorter than min_segment_tokens"),
        ([(10, 16)], [6], "fewer reused tokens than min_reused_tokens"),
        ([(80, 90)], [10], "mostly recomputed: 80 of 90 tokens"),
    ],
)
def test_when_a_request_does_not_blend(spans: list[tuple[int, int]], hits: list[int], why: str) -> None:
    assert plan_blend(100, 0, spans, hits, POLICY) is None, why


def test_spans_are_checked() -> None:
    assert check_spans([[20, 30], [0, 10]], 30) == [(0, 10), (20, 30)]
    many = [[i, i + 1] for i in range(1025)]
    for bad, message in [
        ([[0, 40]], "inside"),
        ([[5, 5]], "inside"),
        ([[0, 10], [5, 20]], "overlap"),
        ([[1]], "span"),
        (many, "at most 1024"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_spans(bad, 2000 if len(bad) > 1000 else 30)


def test_passages_between_separator_ids() -> None:
    tokens = np.array([1, 2, 9, 9, 3, 4, 5, 9, 9, 9, 9, 6, 9, 9], dtype=np.int32)
    assert spans_between(tokens, [9, 9]) == [(0, 2), (4, 7), (11, 12)]
    assert spans_between(tokens, []) == [(0, 14)]
    assert spans_between(np.array([1], dtype=np.int32), [9, 9]) == [(0, 1)]


def test_the_domain_names_the_rope_the_kv_was_moved_with() -> None:
    def spec(theta: float, neox: bool = True) -> RopeSpec:
        inv = 1.0 / (theta ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
        return RopeSpec(head_size=64, rotary_dim=64, neox=neox, cos_sin=inverse_frequency_angles(inv))

    assert segment_domain(spec(10000.0)) == segment_domain(spec(10000.0))
    assert segment_domain(spec(10000.0)).startswith(DOMAIN + "/")
    names = {segment_domain(spec(10000.0)), segment_domain(spec(500000.0)), segment_domain(spec(10000.0, neox=False))}
    assert len(names) == 3


def test_selection_budgets_and_strategies() -> None:
    assert [budget(r, 100) for r in (0.0, 0.001, 0.15, 1.0)] == [0, 1, 15, 100]
    scores = torch.tensor([0.1, 5.0, 0.3, 9.0, 0.2])
    offsets = torch.tensor([4, 3, 2, 1, 0])
    generator = torch.Generator().manual_seed(0)
    assert choose("hkvd", 2, scores, offsets, generator).tolist() == [1, 3]
    assert choose("head", 2, scores, offsets, generator).tolist() == [3, 4]
    drawn = choose("random", 3, scores, offsets, torch.Generator().manual_seed(1))
    assert drawn.tolist() == choose("random", 3, scores, offsets, torch.Generator().manual_seed(1)).tolist()
    assert len(set(drawn.tolist())) == 3
    assert choose("hkvd", 9, scores, offsets, generator).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"check_layers": (1, 2), "ratios": (0.2,)}, "differ in length"),
        ({"check_layers": (2, 1), "ratios": (0.3, 0.2)}, "increasing"),
        ({"check_layers": (1, 2), "ratios": (0.1, 0.2)}, "not increase"),
        ({"ratios": (1.5,)}, "lie in"),
    ],
)
def test_a_bad_selection_is_refused_with_its_reason(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SelectionConfig(**settings)  # type: ignore[arg-type]
