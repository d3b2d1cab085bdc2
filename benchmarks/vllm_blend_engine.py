"""One vLLM process for :mod:`benchmarks.vllm_blend` (vLLM spawns workers, so it runs as a script).

    python -m benchmarks.vllm_blend_engine MODEL WORKLOAD.json OUT.json [--lmplug JSON]

The workload (written by :mod:`benchmarks.vllm_blend`) holds the prompts as token ids, the
span of each passage in them, the arms and how much to measure. Every prompt is measured in
the same way, one request at a time:

- **TTFT**: the wall time of ``generate(max_tokens=1)``, ``ttft_samples`` times;
- **continuation**: ``answer_tokens`` greedy tokens (``ignore_eos``);
- **teacher-forced**: the prompt followed by the reference continuation, ``max_tokens=1`` and
  ``prompt_logprobs=top``: for each continuation token its logprob and the ``top`` most likely
  tokens at that step. Up to the first token where an arm's own continuation leaves the
  reference, these are the arm's own distributions (the context is the same), so the
  continuation needs no logprobs of its own.

Without ``--lmplug`` (vLLM alone, the reference) each prompt is measured once, and its own
continuation is the reference. With ``--lmplug`` (a config with ``extensions.blend``), per
prompt:

1. **ingest**: the prompt's passages in their original order, with spans for those the cache
   does not hold yet (an earlier prompt may have had some): with nothing to reuse it is computed
   exactly, and its passages are cached when it finishes;
2. a short **flush** request: the saves of a finished request run in the engine's next step;
3. every **blend arm**, its selection given per request, on the permuted prompt with its spans
   (blended requests store nothing, so every arm sees the same cache);
4. the **probe**: how many leading tokens of the prompt, and of the teacher-forced prompt, lmplug
   holds under prefix keys (none: nothing blended is stored there);
5. the **prefix-only** arm (no spans: lmplug's prefix cache alone) comes last, because it stores
   its prompt. Its TTFT is measured once, first (a second request would hit what the first
   stored), then the probe again: the positive control.

Each request records the blend counters it moved (the worker's statistics before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.vllm_setup import connector, prepare_environment

FLUSH = list(range(1000, 1016))  # a short prompt of its own: it runs the step that saves the last request's passages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("workload")
    parser.add_argument("out")
    parser.add_argument("--lmplug", help="lmplug config as JSON, with extensions.blend (omit for vLLM alone)")
    args = parser.parse_args()
    workload = json.loads(Path(args.workload).read_text())
    prepare_environment(1)  # GiB: 45k tokens of SmolLM2's KV, many times one prompt
    from vllm import LLM

    engine_id = f"bench-blend-{os.getpid()}"
    extra = connector(engine_id, json.loads(args.lmplug) if args.lmplug else None)
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=workload["max_model_len"],
        max_num_batched_tokens=workload["max_model_len"],  # every prompt in one step, in both engines
        enable_prefix_caching=False,
        seed=0,
        **extra,
    )
    engine = Engine(llm, workload, engine_id if args.lmplug else None)
    try:
        report = engine.run_blended() if args.lmplug else engine.run_alone()
    finally:
        engine.close()
    Path(args.out + ".part").write_text(json.dumps(report))
    os.replace(args.out + ".part", args.out)


class Engine:
    """The requests of one vLLM process, and the worker's blend counters around each."""

    def __init__(self, llm: Any, workload: dict[str, Any], engine_id: str | None) -> None:
        self.llm = llm
        self.workload = workload
        self.client: Any = None
        if engine_id is not None:
            from lmplug.integrations.vllm.lookup import LookupClient, socket_path

            self.client = LookupClient(socket_path(engine_id))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    # ------------------------------------------------------------------ requests

    def counters(self) -> dict[str, Any]:
        if self.client is None:
            return {}
        reported = self.client.statistics()
        blend = dict(reported["extensions"]["blend"])
        blend["extension_load_failures"] = reported["transfers"]["extension_load_failures"]
        return blend

    def ask(
        self,
        prompt: Sequence[int],
        spans: Sequence[Sequence[int]] | None,
        selection: dict[str, Any] | None,
        **sampling: Any,
    ) -> tuple[Any, float, dict[str, Any]]:
        """One request alone on the engine: its output, wall seconds, and the counters it moved."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        extra_args = None
        if spans:
            blend: dict[str, Any] = {"segments": [list(span) for span in spans]}
            if selection is not None:
                blend["selection"] = selection
            extra_args = {"kv_transfer_params": {"lmplug": {"blend": blend}}}
        params = SamplingParams(temperature=0, detokenize=False, extra_args=extra_args, **sampling)
        before = self.counters()
        started = time.perf_counter()
        (output,) = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt))], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        after = self.counters()
        moved = {key: after[key] - before[key] for key in after if isinstance(after[key], int | float)}
        moved["cached_tokens"] = output.num_cached_tokens or 0
        return output, seconds, moved

    def ttft(self, prompt: Sequence[int], spans: Any, selection: Any) -> tuple[float, dict[str, Any]]:
        _, seconds, moved = self.ask(prompt, spans, selection, max_tokens=1)
        return seconds, moved

    def continuation(self, prompt: Sequence[int], spans: Any, selection: Any) -> tuple[list[int], dict[str, Any]]:
        count = self.workload["answer_tokens"]
        output, _, moved = self.ask(prompt, spans, selection, max_tokens=count, ignore_eos=True)
        return list(output.outputs[0].token_ids), moved

    def teacher_forced(
        self, prompt: Sequence[int], continuation: Sequence[int], spans: Any, selection: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each continuation token's logprob and the top tokens at its step, given the prompt and the
        reference continuation before it. vLLM lists a logprob for every prompt position but the first;
        those of loaded positions are not the model's, so a load must stop before the continuation."""
        output, _, moved = self.ask(
            [*prompt, *continuation], spans, selection,
            max_tokens=1, prompt_logprobs=self.workload["top"],
            skip_reading_prefix_cache=False,  # vLLM would otherwise drop the connector's load for prompt logprobs
        )  # fmt: skip
        if moved.get("extension_load_failures"):
            raise RuntimeError("lmplug-blend failed to load a teacher-forced request (the engine log says why)")
        listed = output.prompt_logprobs or []
        steps = listed[len(listed) - len(continuation) :]
        loaded = output.num_cached_tokens or 0
        if (
            loaded >= len(prompt)
            or len(listed) != len(prompt) + len(continuation)
            or any(step is None or token not in step for token, step in zip(continuation, steps, strict=True))
        ):
            raise RuntimeError(
                f"the teacher-forced request lacks the logprobs of some continuation tokens (a load reached into "
                f"them: {loaded} of {len(prompt)} prompt tokens cached)"
            )
        top = [{str(token): entry.logprob for token, entry in step.items()} for step in steps]
        nll = [-step[token].logprob for token, step in zip(continuation, steps, strict=True)]
        return {"top": top, "nll": nll}, moved

    def measure(
        self,
        prompt: Sequence[int],
        reference: Sequence[int] | None,
        spans: Any,
        selection: Any,
        *,
        before: int,
        after: int,
    ) -> dict[str, Any]:
        """One arm on one prompt: ``before`` TTFT samples, the continuation, the teacher-forced
        logprobs (of ``reference``, else of the continuation), then ``after`` TTFT samples."""
        requests: list[dict[str, Any]] = []

        def timed(count: int) -> list[float]:
            seconds = []
            for _ in range(count):
                elapsed, moved = self.ttft(prompt, spans, selection)
                seconds.append(elapsed)
                requests.append({"kind": "ttft", **moved})
            return seconds

        ttft = timed(before)
        tokens, moved = self.continuation(prompt, spans, selection)
        requests.append({"kind": "continuation", **moved})
        forced, moved = self.teacher_forced(prompt, tokens if reference is None else reference, spans, selection)
        requests.append({"kind": "teacher_forced", **moved})
        ttft += timed(after)
        return {"ttft": ttft, "tokens": tokens, **forced, "requests": requests}

    # ------------------------------------------------------------------ runs

    def run_alone(self) -> dict[str, Any]:
        samples = self.workload["ttft_samples"]
        self.ttft(self.workload["prompts"][0]["prompt"], None, None)  # warm-up
        prompts = []
        for item in self.workload["prompts"]:
            prompts.append(
                {"id": item["id"], "full": self.measure(item["prompt"], None, None, None, before=0, after=samples)}
            )
            _progress("alone", item["id"], prompts[-1]["full"]["ttft"])
        return {"prompts": prompts}

    def run_blended(self) -> dict[str, Any]:
        from lmplug_blend.extension import encode_query

        samples = self.workload["ttft_samples"]
        blend_arms = [arm for arm in self.workload["arms"] if arm["spans"]]
        prefix_arms = [arm for arm in self.workload["arms"] if not arm["spans"]]
        self.ttft(FLUSH, None, None)  # warm-up
        prompts = []
        for item in self.workload["prompts"]:
            prompt, spans, ingest, ingest_spans = item["prompt"], item["spans"], item["ingest"], item["ingest_spans"]
            answer = self.client.extension("blend", encode_query(ingest, [tuple(span) for span in ingest_spans]))
            held = np.frombuffer(answer, dtype="<u4").tolist() if answer is not None else [0] * len(ingest_spans)
            new = [span for span, hit in zip(ingest_spans, held, strict=True) if hit < span[1] - span[0]]
            _, _, ingested = self.ask(ingest, new, None, max_tokens=1)
            _, _, flushed = self.ask(FLUSH, None, None, max_tokens=1)
            record: dict[str, Any] = {
                "id": item["id"],
                "ingest": {"passages_held": sum(1 for span in ingest_spans if span not in new), **ingested},
                "flush": flushed,
                "arms": {},
            }
            for arm in blend_arms:
                record["arms"][arm["name"]] = self.measure(
                    prompt, item["continuation"], spans, arm["selection"], before=0, after=samples
                )
            forced = [*prompt, *item["continuation"]]
            record["probe"] = {"prompt": self.held(prompt), "teacher_forced": self.held(forced)}
            for arm in prefix_arms:
                record["arms"][arm["name"]] = self.measure(prompt, item["continuation"], None, None, before=1, after=0)
            record["control"] = {"prompt": self.held(prompt), "teacher_forced": self.held(forced)}
            prompts.append(record)
            _progress("lmplug", item["id"], [statistics.median(arm["ttft"]) for arm in record["arms"].values()])
        return {"prompts": prompts, "worker": self.client.statistics()}

    def held(self, tokens: Sequence[int]) -> int | None:
        """Leading tokens of ``tokens`` lmplug holds under prefix keys (the lookup's lease let go at once)."""
        probe = f"probe-{time.monotonic_ns()}"
        try:
            held: int | None = self.client.lookup(probe, list(tokens))
            return held
        finally:
            self.client.release(probe)


def _progress(engine: str, index: int, seconds: Sequence[float]) -> None:
    shown = " ".join(f"{value:.2f}" for value in seconds)
    print(f"[{engine}] prompt {index}: TTFT {shown} s", flush=True)


if __name__ == "__main__":
    main()
