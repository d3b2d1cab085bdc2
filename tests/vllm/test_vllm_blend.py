"""CacheBlend end to end in real vLLM (the CPU build) on the random-weight test model.

Passages cached from one prompt are blended into others, behind other system lines and in
other orders (lmplug-blend, ``extensions.blend``). Recomputing every token (r = 1) must give
vLLM alone's output; with r = 0.15 the counters show the selection; a blend the layer-0 check
refuses is computed in full, with vLLM alone's output. A blended request never stores KV under
prefix keys. (Quality at r < 1 needs trained weights: the SmolLM2 benchmark measures it.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("vllm", reason="vLLM is not installed")
pytest.importorskip("lmplug_blend", reason="lmplug-blend is not installed")

from agreement import compare
from engine_blend import PASSAGE_TOKENS, SYSTEM_TOKENS

from lmplug.testing.vllm_model import build_model

HERE = Path(__file__).parent
POLICY = {"min_reused_tokens": 64, "min_segment_tokens": 16}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model"), "tiny")


def run(model: Path, directory: Path, name: str, blend: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    out = directory / f"{name}.json"
    command = [sys.executable, str(HERE / "engine_blend.py"), str(model), str(out)]
    if blend is not None:
        config = directory / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump({"tiers": [{"type": "cpu", "capacity": "256MiB"}], "extensions": {"blend": blend}})
        )
        command += ["--lmplug", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return {entry["name"]: entry for entry in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def alone(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return run(model_dir, tmp_path_factory.mktemp("alone"), "alone", None)


@pytest.fixture(scope="module")
def full_recompute(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    blend = {"policy": POLICY, "selection": {"ratios": [1.0]}}
    return run(model_dir, tmp_path_factory.mktemp("r1"), "r1", blend)


@pytest.fixture(scope="module")
def selective(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    blend = {"policy": POLICY, "selection": {"ratios": [0.15]}}
    return run(model_dir, tmp_path_factory.mktemp("r015"), "r015", blend)


@pytest.fixture(scope="module")
def refused(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    blend = {"policy": POLICY, "layer0_tolerance": 1e-9, "disable_after": 0}
    return run(model_dir, tmp_path_factory.mktemp("refused"), "refused", blend)


def test_passages_are_cached_from_a_prompt_computed_exactly(full_recompute: dict[str, dict[str, Any]]) -> None:
    ingest = full_recompute["ingest"]["blend"]
    assert ingest["blends"] == 0
    assert ingest["saved_passages"] == 3
    assert ingest["saved_tokens"] == 3 * PASSAGE_TOKENS


def test_recomputing_every_token_gives_vllm_alones_output(
    alone: dict[str, dict[str, Any]], full_recompute: dict[str, dict[str, Any]]
) -> None:
    permuted, missed = full_recompute["permuted"], full_recompute["missed"]
    assert permuted["blend"]["blends"] == 1
    assert permuted["blend"]["reused_tokens"] == 3 * PASSAGE_TOKENS
    # The system line is computed (nothing covers it), and so is the never-seen passage D.
    assert permuted["blend"]["forced_tokens"] == SYSTEM_TOKENS
    assert missed["blend"]["blends"] == 2
    assert missed["blend"]["reused_tokens"] == 5 * PASSAGE_TOKENS
    assert missed["blend"]["forced_tokens"] == 2 * SYSTEM_TOKENS + PASSAGE_TOKENS
    for name in ("permuted", "missed"):
        agreement = compare(alone[name], full_recompute[name])
        assert agreement.ok, f"{name}: {agreement.mismatch}"


def test_a_blend_recomputes_the_selected_share_of_reused_tokens(selective: dict[str, dict[str, Any]]) -> None:
    counters = selective["permuted"]["blend"]
    assert counters["blends"] == 1
    assert counters["reused_tokens"] == 3 * PASSAGE_TOKENS
    assert counters["recomputed_tokens"] == math.ceil(0.15 * 3 * PASSAGE_TOKENS)
    assert counters["rejected"] == counters["failures"] == 0
    assert selective["permuted"]["transfers"]["extension_load_failures"] == 0


def test_blended_requests_store_nothing_under_prefix_keys(
    full_recompute: dict[str, dict[str, Any]], selective: dict[str, dict[str, Any]]
) -> None:
    # Each prompt begins with a system line no other prompt has: only its own saves could be found.
    assert full_recompute["ingest"]["prefix_held"] > 0  # computed exactly: saved as usual
    for run_results in (full_recompute, selective):
        assert run_results["permuted"]["prefix_held"] == 0
        assert run_results["missed"]["prefix_held"] == 0


def test_a_refused_blend_is_computed_in_full(
    alone: dict[str, dict[str, Any]], refused: dict[str, dict[str, Any]]
) -> None:
    counters = refused["missed"]["blend"]
    assert counters["blends"] == 0
    assert counters["rejected"] == 2
    assert refused["missed"]["transfers"]["extension_load_failures"] == 2
    for name in ("permuted", "missed"):
        agreement = compare(alone[name], refused[name])
        assert agreement.ok, f"{name}: {agreement.mismatch}"
