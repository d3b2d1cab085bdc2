"""Do two greedy vLLM generations agree, up to what bfloat16 rounding explains?

A generation is ``{"tokens": [id, ...], "logprobs": [{"id": logprob, ...}, ...]}``: the greedy
tokens and, for each step, vLLM's top-k logprobs (token ids as JSON keys), as the engine
scripts beside this module write them.

vLLM on a CPU is not bitwise reproducible from one process to the next, and a prefill on
top of cached KV runs differently shaped kernels than a full prefill, so two correct runs may
round some bfloat16 values differently. How far that can move a logprob: the logits come
out of the bfloat16 ``lm_head`` and are widened to float32 only for ``log_softmax``, so a
logprob is ``logit - logsumexp(logits)`` with a bfloat16 logit. The random-weight test
model's logits stay below 2 in magnitude (the largest is 1.1 to 1.6 for every test prompt),
where bfloat16's 8-bit significand spaces values ``2**-7`` (0.0078) apart. Last-bit
differences in the activations move a logit to a neighbouring bfloat16 value (seen between
processes: 0.0078) or, compounded over the layers, two values away; ``logsumexp`` averages
8000 logits, so the same differences move it by about 1e-4 (the -7.91498 vs -7.91502 seen
between two processes). Hence ``LOGPROB_TOLERANCE = 2 * 2**-7 + 2**-9`` (0.0176). Wrong
KV moves logprobs further: with another request's KV for 424 of 1100 prompt tokens (the
stress test's control) they move by 0.02 to 0.09 in the first steps, and negated KV (the
disk test's control) replaces the top tokens altogether.

The same rounding can swap the order of two logits one or two bfloat16 steps apart, which a
random-weight model produces often. Greedy decoding then continues from a different token,
so the sequences may part there and nothing after that step is comparable; everything up to
and including it is. Elsewhere the tokens must be identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LOGPROB_TOLERANCE = 2 * 2**-7 + 2**-9


@dataclass(frozen=True, slots=True)
class Agreement:
    """How far two generations were compared, and their first difference beyond rounding."""

    steps: int  # steps whose logprobs were compared
    parted_at: int | None  # step where a near-tie went the other way; later steps were not compared
    mismatch: str | None  # None: the generations agree

    @property
    def ok(self) -> bool:
        return self.mismatch is None


def compare(
    reference: Mapping[str, Any], candidate: Mapping[str, Any], tolerance: float = LOGPROB_TOLERANCE
) -> Agreement:
    """Compare ``candidate`` with ``reference`` step by step (see the module docstring)."""
    ref_tokens, cand_tokens = reference["tokens"], candidate["tokens"]
    ref_steps, cand_steps = reference["logprobs"], candidate["logprobs"]
    if len(ref_tokens) != len(cand_tokens):
        return Agreement(0, None, f"{len(ref_tokens)} vs {len(cand_tokens)} tokens")
    if len(ref_steps) != len(ref_tokens) or len(cand_steps) != len(cand_tokens):
        return Agreement(0, None, "a generation lacks the logprobs of some steps")
    for index, (ref_token, cand_token, ref_step, cand_step) in enumerate(
        zip(ref_tokens, cand_tokens, ref_steps, cand_steps, strict=True)
    ):
        problem = _step_mismatch(ref_step, cand_step, tolerance)
        if problem is not None:
            return Agreement(index + 1, None, f"step {index}: {problem}")
        if ref_token != cand_token:
            # Both logprobs agree within ``tolerance``, so the two choices are at most twice
            # that apart in either run; checked anyway, for a token outside the reference's top-k.
            best = ref_step[str(ref_token)]
            chosen = ref_step.get(str(cand_token), min(ref_step.values()))
            if best - chosen > 2 * tolerance:
                return Agreement(index + 1, None, f"step {index}: token {cand_token} instead of {ref_token}")
            return Agreement(index + 1, index, None)
    return Agreement(len(ref_tokens), None, None)


def _step_mismatch(reference: Mapping[str, float], candidate: Mapping[str, float], tolerance: float) -> str | None:
    """A difference between one step's top-k logprobs that rounding cannot explain, or None."""
    for token in reference.keys() & candidate.keys():
        if abs(reference[token] - candidate[token]) > tolerance:
            return f"token {token}: logprob {reference[token]:.5f} vs {candidate[token]:.5f}"
    # A token in only one top-k must sit at the other's cut-off: rounding pushed it just below.
    for mine, other, side in ((reference, candidate, "reference"), (candidate, reference, "candidate")):
        floor = min(other.values())
        for token in mine.keys() - other.keys():
            if mine[token] > floor + tolerance:
                return f"token {token} ({mine[token]:.5f}) is only in the {side}'s top-k (other's lowest {floor:.5f})"
    return None
