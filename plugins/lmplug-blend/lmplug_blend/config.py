"""lmplug-blend's configuration: which tokens a blend recomputes, and when a request blends."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, model_validator

from lmplug.tierkit import StrictModel

Strategy = Literal["hkvd", "random", "head"]
Metric = Literal["value", "key", "kv"]


class SelectionConfig(StrictModel):
    """Which reused tokens are recomputed (CacheBlend's selective recompute).

    Every layer up to the first check layer computes every token. At each check layer the
    tokens still computed are ranked by how far their fresh KV is from the reused KV, and the
    ``ratios[i]`` share of the reused tokens with the highest deviation (HKVD) goes on to the
    next layers; a list of check layers with falling ratios is the paper's gradual filtering.
    No check layers means full reuse (nothing reused is recomputed: the PromptCache baseline).
    """

    strategy: Strategy = Field(
        default="hkvd", description="hkvd: highest KV deviation; random and head (the first tokens) are baselines."
    )
    metric: Metric = Field(default="value", description="The deviation ranked: of V, of K (re-rotated), or both.")
    check_layers: tuple[NonNegativeInt, ...] = Field(default=(1,), description="Layers where tokens are selected.")
    ratios: tuple[float, ...] = Field(default=(0.15,), description="Share of reused tokens kept at each check layer.")
    head_tokens: NonNegativeInt = Field(
        default=0, description="Always recompute the first tokens of each passage (EPIC's attention-sink fix)."
    )
    seed: int = Field(default=0, description="Seed of the random strategy.")

    @model_validator(mode="after")
    def _check(self) -> SelectionConfig:
        if len(self.check_layers) != len(self.ratios):
            raise ValueError(f"check_layers {list(self.check_layers)} and ratios {list(self.ratios)} differ in length")
        if list(self.check_layers) != sorted(set(self.check_layers)):
            raise ValueError(f"check_layers {list(self.check_layers)} must be increasing")
        if any(not 0.0 <= ratio <= 1.0 for ratio in self.ratios) or list(self.ratios) != sorted(
            self.ratios, reverse=True
        ):
            raise ValueError(f"ratios {list(self.ratios)} must lie in [0, 1] and not increase")
        return self


class PolicyConfig(StrictModel):
    """When a request blends at all (otherwise it is served as a plain prefix lookup would serve it)."""

    min_segment_tokens: NonNegativeInt = Field(default=32, description="Shorter passages are not reused.")
    min_reused_tokens: NonNegativeInt = Field(default=256, description="A request blends from this many reused tokens.")
    max_forced_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Largest share of the blended range with nothing reused."
    )


class BlendConfig(StrictModel):
    """``extensions.blend``: CacheBlend in vLLM."""

    separator_ids: tuple[NonNegativeInt, ...] = Field(
        default=(),
        description="Token ids that separate passages in every prompt; without them, only requests that "
        "give their passages (kv_transfer_params.lmplug.blend.segments) blend.",
    )
    separator: str | None = Field(
        default=None,
        description="Text that separates passages, turned into token ids with `tokenizer` at start-up: in "
        "context, and only if its tokens never merge with the text around it (else a start-up error).",
    )
    tokenizer: str | None = Field(
        default=None, description="The tokenizer (a directory, or a model id cached locally) of `separator`."
    )
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    layer0_tolerance: float = Field(
        default=0.02, gt=0.0, description="Largest relative layer-0 difference between reused and fresh KV."
    )
    disable_after: NonNegativeInt = Field(
        default=3, description="Turn blending off after this many blends in a row fail the layer-0 check (0: never)."
    )

    @model_validator(mode="after")
    def _check(self) -> BlendConfig:
        if (self.separator is None) != (self.tokenizer is None):
            raise ValueError("separator and tokenizer go together: the separator's token ids come from the tokenizer")
        if self.separator is not None and self.separator_ids:
            raise ValueError("give separator_ids or separator, not both")
        if self.separator == "":
            raise ValueError("separator must not be empty")
        return self
