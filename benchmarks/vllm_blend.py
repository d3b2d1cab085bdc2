"""CacheBlend (lmplug-blend) on a real model in real vLLM: quality against full prefill, and TTFT.

SmolLM2-135M-Instruct (``lmplug.models``) in vLLM's CPU build, vLLM's own prefix cache off,
on MuSiQue questions (``../shared/data/musique_s.json`` beside the repository, CacheBlend's
evaluation set; skipped with a note when absent). A prompt is the chat template's system turn
with the CacheBlend prototype's instruction, 6 of the question's passages (the first six,
each ``title\\n\\ntext\\n\\n`` cut to whole sentences of at most 280 tokens, so that a prompt
is 1.2-1.75k tokens, median 1.68k), then the question; every piece is tokenized on its own and the pieces
concatenated, so a passage has the same tokens wherever it stands. The passages are spans; the
system turn and the question are not. The prompt measured puts the passages in a permuted
order (seeded per question, never the original first passage first, so that no chunk of it
is an exact prefix of the ingested prompt).

Two vLLM processes, one after the other, on the same single compute core
(``VLLM_CPU_NUM_OF_RESERVED_CPU=1``, as every vLLM benchmark here):

- **full prefill** (vLLM alone, no connector): per prompt, TTFT (wall time of
  ``generate(max_tokens=1)``, median of 3), the 32-token greedy continuation (``ignore_eos``;
  the reference) and its teacher-forced logprobs (the prompt plus the continuation,
  ``prompt_logprobs=20``);
- **lmplug** (``LMPlugConnector``, one ``cpu`` tier, ``extensions.blend`` with a policy that
  blends these prompts): per prompt, an ingest request in the original order caches the
  passages, then every arm on the permuted prompt, its selection given per request: HKVD at
  check layer 1 with r = 0.05, 0.15, 0.3, 0.5, 1; random at r = 0.15; full reuse (no check
  layer); and last prefix-only (no spans: lmplug's prefix cache alone, TTFT sampled once since
  it stores its prompt). Each arm: TTFT (median of 3), its own continuation, and the
  teacher-forced logprobs of the reference continuation. The blend counters of every request
  show that each blend arm blended (details: ``benchmarks/vllm_blend_engine.py``).

Metrics per arm against full prefill, each a mean over questions with a 95 % bootstrap
interval (1000 resamples of the questions, seed 0): exact match of the 32 tokens, and
"identical or parted at a near tie" (the rule of tests/vllm/test_vllm_pd.py: the tokens agree
up to a step where the arm's choice is within 0.5 of the reference's logprob, and no logprob of
the top 5 both list moved further before); ROUGE-L F1 of the continuations (longest common
subsequence of token ids); KL(P_full || P_arm) of the first token over the union of both top-20 lists and a
tail bucket; teacher-forced delta NLL per token; SQuAD-style word F1 of the decoded answer
(up to the first special token, first line) against the best gold answer, for both. The
up-to-divergence logprobs come from the teacher-forced request: until an arm's continuation
parts from the reference, its context is the reference's.

Targets: r = 1 identical on >= 99 % of prompts (and the near-tie variant); r = 0.15 ROUGE-L
>= 0.85 and at least random r = 0.15's and full reuse's; TTFT at r = 0.15 <= 0.4x full
prefill; and no blended KV under prefix keys (lmplug's prefix lookup of each blended prompt
finds 0 tokens, against the prefix-only arm's stored prompt as the positive control); and every
request of a blend arm blended, every passage token reused.

``LMPLUG_BLEND_QUESTIONS`` (default 15) and ``LMPLUG_BLEND_OUT`` (default
``$TMPDIR/lmplug-vllm-blend``) set the number of questions and where the summary
(``vllm_blend.json``), the plot (``vllm_blend.png``) and each engine's report and log go;
``python -m benchmarks.vllm_blend --questions N --out DIR`` runs it alone. About 55 s per
question on two cores (45 of them in the lmplug engine: 9 continuations of 32 tokens, 23 TTFT
samples, 8 teacher-forced requests), plus a minute and a half of start-up: 15 questions take
about 15 minutes, so ``--quick`` skips it.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import re
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Result, Settings, Stats, Target, format_table

NAME = "vllm_blend"
SUMMARY = "CacheBlend on SmolLM2 + MuSiQue in vLLM: quality vs full prefill (r=0.15 ROUGE-L >= 0.85), TTFT <= 0.4x"
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "musique_s.json"
QUESTIONS_ENV = "LMPLUG_BLEND_QUESTIONS"
OUT_ENV = "LMPLUG_BLEND_OUT"
QUESTIONS = 15  # about 15 minutes on two cores

PASSAGES = 6
PASSAGE_TOKENS = 280
ANSWER_TOKENS = 32
TOP = 20
TTFT_SAMPLES = 3
NEAR_TIE = 0.5
"""How far below the reference's choice another token may be and still be a correct greedy choice
(tests/vllm/test_vllm_pd.py: SmolLM2's bfloat16 logits lie 0.125-0.25 apart, and a prefill over
loaded KV rounds differently from a whole one)."""
AGREEMENT_TOP = 5
RESAMPLES = 1000
SEED = 0

SYSTEM = "You are a helpful assistant."
INSTRUCTION = (
    "You will be asked a question after reading several passages. Please directly answer the question based on "
    "the given passages. Do NOT repeat the question. The answer should be within 5 words..\nPassages:\n"
)
QUERY = (
    "\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. "
    "The answer should be within 5 words. \nQuestion:"
)  # the CacheBlend prototype's prompt (example/blend_musique.py), as the paper's evaluation used it

STACK: dict[str, Any] = {
    "chunk_size": 256,
    # Whole chunks only: the prefix-only arm's teacher-forced prompt then loads at most the prompt's
    # whole chunks, never its last token, whose logits give the first continuation token's logprob.
    "save_partial_chunks": False,
    "tiers": [{"type": "cpu", "capacity": "2GiB"}],
    "extensions": {
        "blend": {
            "policy": {"min_reused_tokens": 64, "min_segment_tokens": 16},
            "disable_after": 0,  # a refused blend is a finding to count, not a reason to stop blending
        }
    },
}


@dataclass(frozen=True, slots=True)
class Arm:
    """One way of serving the permuted prompt from engine B: a blend selection, or (``spans``
    false) lmplug's prefix cache alone."""

    name: str
    selection: dict[str, Any] | None
    ratio: float | None = None
    spans: bool = True


def _hkvd(ratio: float) -> Arm:
    return Arm(f"hkvd r={ratio:g}", {"strategy": "hkvd", "check_layers": [1], "ratios": [ratio]}, ratio)


RATIOS = (0.05, 0.15, 0.3, 0.5, 1.0)
ARMS = (
    *(_hkvd(ratio) for ratio in RATIOS),
    Arm("random r=0.15", {"strategy": "random", "check_layers": [1], "ratios": [0.15]}, 0.15),
    Arm("full reuse", {"check_layers": [], "ratios": []}, 0.0),
    Arm("prefix-only", None, spans=False),
)
R1, R015, RANDOM, REUSE, PREFIX = "hkvd r=1", "hkvd r=0.15", "random r=0.15", "full reuse", "prefix-only"


# ---------------------------------------------------------------------------- prompts


@dataclass(frozen=True, slots=True)
class Prompt:
    """One question's prompts: the permuted one measured, and the ingest in the original order."""

    id: int
    prompt: list[int]
    spans: list[list[int]]
    ingest: list[int]
    ingest_spans: list[list[int]]
    answers: list[str]


def _assemble(head: list[int], passages: Sequence[list[int]], tail: list[int]) -> tuple[list[int], list[list[int]]]:
    tokens, spans = list(head), []
    for passage in passages:
        spans.append([len(tokens), len(tokens) + len(passage)])
        tokens += passage
    return tokens + tail, spans


def _passage(tokenizer: Any, title: str, text: str) -> list[int]:
    """``title\\n\\ntext\\n\\n`` cut to the whole sentences that fit in :data:`PASSAGE_TOKENS`."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    kept = sentences[:1]
    for sentence in sentences[1:]:
        if len(_encode(tokenizer, f"{title}\n\n{' '.join([*kept, sentence])}\n\n")) > PASSAGE_TOKENS:
            break
        kept.append(sentence)
    return _encode(tokenizer, f"{title}\n\n{' '.join(kept)}\n\n")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _question(question: str) -> str:
    question = question if question.endswith("?") else question + "?"
    return question[0].lower() + question[1:]


def build_prompts(tokenizer: Any, examples: Sequence[Mapping[str, Any]]) -> list[Prompt]:
    marker = "\x00"
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": marker}]
    template = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    before, after = template.split(marker)
    head = _encode(tokenizer, before + INSTRUCTION)
    prompts = []
    for index, example in enumerate(examples):
        passages = [_passage(tokenizer, ctx["title"], ctx["text"]) for ctx in example["ctxs"][:PASSAGES]]
        tail = _encode(tokenizer, f"{QUERY}{_question(example['question'])}\nAnswer:{after}")
        order = list(range(len(passages)))
        rng = random.Random(f"vllm_blend-{index}")
        while order[0] == 0:
            rng.shuffle(order)
        prompt, spans = _assemble(head, [passages[i] for i in order], tail)
        ingest, ingest_spans = _assemble(head, passages, tail)
        prompts.append(Prompt(index, prompt, spans, ingest, ingest_spans, list(example["answers"])))
    return prompts


# ---------------------------------------------------------------------------- metrics


def rouge_l(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """ROUGE-L F1: the longest common subsequence against both lengths."""
    if not reference or not candidate:
        return float(reference == candidate)
    previous = [0] * (len(candidate) + 1)
    for token in reference:
        current = [0]
        for column, other in enumerate(candidate):
            current.append(previous[column] + 1 if token == other else max(previous[column + 1], current[column]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def agreement(
    reference: Sequence[int], reference_top: Sequence[Mapping[str, float]], candidate: Sequence[int],
    candidate_top: Sequence[Mapping[str, float]],
) -> str | None:  # fmt: skip
    """None when ``candidate`` is the reference's greedy continuation but for parting at a near tie,
    as ``agreement`` in tests/vllm/test_vllm_pd.py decides it (the tokens agree up to a step where
    the candidate's choice is within :data:`NEAR_TIE` of the reference's logprob, and no logprob of
    the top :data:`AGREEMENT_TOP` both list moved further until then: the tail of a top-20 list
    moves more under rounding than the top few the PD test asks for); else what differs."""
    for step, (expected, got) in enumerate(zip(reference, candidate, strict=True)):
        mine, theirs = _top(reference_top[step], AGREEMENT_TOP), _top(candidate_top[step], AGREEMENT_TOP)
        for token in mine.keys() & theirs.keys():
            if abs(mine[token] - theirs[token]) > NEAR_TIE:
                return f"step {step}: the logprob of {token} moved from {mine[token]:.3f} to {theirs[token]:.3f}"
        if expected != got:
            listed = reference_top[step]
            gap = listed[str(expected)] - listed.get(str(got), min(listed.values()) - 1.0)
            return None if gap <= NEAR_TIE else f"step {step}: {got} instead of {expected}, {gap:.3f} below it"
    return None


def _top(logprobs: Mapping[str, float], count: int) -> dict[str, float]:
    return dict(sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[:count])


def _bucketed(top: Mapping[str, float], support: Sequence[str]) -> list[float]:
    """Probabilities over ``support`` and a tail bucket. A token of ``support`` this list lacks is
    below its lowest entry: it gets that entry's probability or an equal share of the mass the list
    leaves, whichever is smaller; the tail holds what remains."""
    probabilities = {token: math.exp(logprob) for token, logprob in top.items()}
    missing = [token for token in support if token not in probabilities]
    left = max(1.0 - sum(probabilities.values()), 0.0)
    share = min(min(probabilities.values()), left / len(missing)) if missing else 0.0
    values = [probabilities.get(token, share) for token in support]
    return [*values, max(1.0 - sum(values), 0.0)]


def first_token_kl(full: Mapping[str, float], arm: Mapping[str, float]) -> float:
    """KL(P_full || P_arm) over the union of both top lists and a tail bucket."""
    support = sorted(full.keys() | arm.keys())
    p, q = _bucketed(full, support), _bucketed(arm, support)
    return sum(pi * (math.log(pi) - math.log(max(qi, 1e-12))) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's word F1 of the normalized prediction against the best gold answer."""
    predicted = _normalize(prediction).split()
    best = 0.0
    for answer in answers:
        gold = _normalize(answer).split()
        common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
        elif common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _answer(tokenizer: Any, tokens: Sequence[int]) -> str:
    """The decoded answer: up to the first special token, its first line."""
    special = set(tokenizer.all_special_ids)
    end = next((index for index, token in enumerate(tokens) if token in special), len(tokens))
    text: str = tokenizer.decode(list(tokens[:end]))
    return text.lstrip("\n").split("\n")[0]


@dataclass(frozen=True, slots=True)
class Interval:
    """A mean over questions and its 95 % bootstrap interval."""

    mean: float
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_json(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap(values: Sequence[float], indices: np.ndarray) -> Interval:
    """The mean of ``values`` and the 2.5-97.5 percentiles of its resampled means (``indices``:
    one row of question indices per resample, shared by every metric, so intervals are paired)."""
    array = np.asarray(values, dtype=float)
    means = array[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(array.mean()), float(low), float(high))


# ---------------------------------------------------------------------------- engines


def _engine(model: Path, work: Path, name: str, workload: Path, stack: dict[str, Any] | None) -> dict[str, Any]:
    out, log = work / f"{name}.json", work / f"{name}.log"
    command = [sys.executable, "-m", "benchmarks.vllm_blend_engine", str(model), str(workload), str(out)]
    if stack is not None:
        command += ["--lmplug", json.dumps(stack)]
    print(f"  {NAME}: {name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with log.open("w") as stream:
        result = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, timeout=7200, check=False)
    print(f"  {NAME}: {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"vLLM run {name} failed (exit {result.returncode}):\n{text[-4000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    report["cores"] = [line.split("]", 1)[-1].strip() for line in text.splitlines() if "core ids=" in line]
    return report


def _workload(path: Path, prompts: Sequence[Prompt], continuations: Mapping[int, list[int]] | None) -> Path:
    longest = max(len(prompt.prompt) for prompt in prompts) + ANSWER_TOKENS + 1
    document = {
        "answer_tokens": ANSWER_TOKENS,
        "top": TOP,
        "ttft_samples": TTFT_SAMPLES,
        "max_model_len": -(-longest // 256) * 256,
        "arms": [{"name": arm.name, "selection": arm.selection, "spans": arm.spans} for arm in ARMS],
        "prompts": [
            {
                "id": prompt.id,
                "prompt": prompt.prompt,
                "spans": prompt.spans,
                "ingest": prompt.ingest,
                "ingest_spans": prompt.ingest_spans,
                **({} if continuations is None else {"continuation": continuations[prompt.id]}),
            }
            for prompt in prompts
        ],
    }
    path.write_text(json.dumps(document))
    return path


# ---------------------------------------------------------------------------- the run


def run(settings: Settings) -> list[Result]:
    if settings.quick:
        print(f"  {NAME}: skipped with --quick (two vLLM processes, about 20 s per question)", file=sys.stderr)
        return []
    questions = int(os.environ.get(QUESTIONS_ENV) or QUESTIONS)
    out = Path(os.environ.get(OUT_ENV) or Path(tempfile.gettempdir()) / "lmplug-vllm-blend")
    return measure(questions, out)


def measure(questions: int, out: Path) -> list[Result]:
    """Run both engines on ``questions`` questions; write ``vllm_blend.json`` (the summary) and
    ``vllm_blend.png`` to ``out``, beside each engine's workload, report and log."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return []
    try:
        import lmplug_blend  # noqa: F401
    except ImportError:
        print(f"  {NAME}: skipped: lmplug-blend is not installed", file=sys.stderr)
        return []
    if not DATA.is_file():
        print(f"  {NAME}: skipped: the MuSiQue data is not at {DATA} (see ../shared/data/README.md)", file=sys.stderr)
        return []
    from lmplug import ConfigError, models

    try:
        checkpoint = models.build("smollm2")
    except ConfigError as exc:
        print(f"  {NAME}: skipped: {exc}", file=sys.stderr)
        return []
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    examples = json.loads(DATA.read_text())[:questions]
    prompts = build_prompts(tokenizer, examples)
    out.mkdir(parents=True, exist_ok=True)  # the engines' workloads, reports and logs stay there too
    alone = _engine(checkpoint, out, "full-prefill", _workload(out / "full-prefill.workload.json", prompts, None), None)
    references = {entry["id"]: entry["full"]["tokens"] for entry in alone["prompts"]}
    blended = _engine(checkpoint, out, "lmplug", _workload(out / "lmplug.workload.json", prompts, references), STACK)
    summary = Summary.of(tokenizer, prompts, alone, blended)
    (out / "vllm_blend.json").write_text(json.dumps(summary.as_json(), indent=2) + "\n")
    summary.plot(out / "vllm_blend.png")
    print(summary.details(), flush=True)
    print(f"  {NAME}: details in {out / 'vllm_blend.json'}, plot {out / 'vllm_blend.png'}", file=sys.stderr)
    return summary.rows()


# ---------------------------------------------------------------------------- summary


@dataclass(frozen=True, slots=True)
class ArmResult:
    """One arm's per-question metrics and counters."""

    arm: Arm
    exact: list[float]
    near_tie: list[float]
    parted: list[str | None]  # per question: how the continuation left the reference's beyond a near tie
    rouge: list[float]
    kl: list[float]
    delta_nll: list[float]
    f1: list[float]
    ttft: list[float]  # per question: the median of the samples, seconds
    blended: int  # requests of this arm that blended, every passage token reused
    requests: int
    counters: dict[str, float]  # per request, mean (rejected and failures: totals)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True, slots=True)
class Summary:
    questions: int
    prompt_tokens: list[int]
    full_ttft: list[float]
    full_f1: list[float]
    full_nll: list[float]
    arms: dict[str, ArmResult]
    ingest: dict[str, int]
    probes: dict[str, int]
    intervals: dict[str, dict[str, Interval]]
    indices: np.ndarray
    cores: dict[str, list[str]]

    @classmethod
    def of(cls, tokenizer: Any, prompts: Sequence[Prompt], alone: dict[str, Any], blended: dict[str, Any]) -> Summary:
        full = {entry["id"]: entry["full"] for entry in alone["prompts"]}
        served = {entry["id"]: entry for entry in blended["prompts"]}
        ids = [prompt.id for prompt in prompts]
        answers = {prompt.id: prompt.answers for prompt in prompts}
        passage_tokens = {prompt.id: sum(end - start for start, end in prompt.spans) for prompt in prompts}
        full_f1 = [answer_f1(_answer(tokenizer, full[i]["tokens"]), answers[i]) for i in ids]
        arms = {}
        for arm in ARMS:
            runs = [served[i]["arms"][arm.name] for i in ids]
            references = [full[i] for i in ids]
            requests = [request for run in runs for request in run["requests"]]
            blends = [  # blended, every passage token reused
                request
                for run, i in zip(runs, ids, strict=True)
                for request in run["requests"]
                if request.get("blends") == 1 and request.get("reused_tokens") == passage_tokens[i]
            ]
            counted = {key for r in requests for key, value in r.items() if isinstance(value, int | float)}
            keys = sorted(counted - {"blends", "rejected", "failures", "extension_load_failures"})
            counters = {key: statistics.mean(r.get(key, 0) for r in requests) for key in keys}
            counters["rejected"] = sum(r.get("rejected", 0) for r in requests)
            counters["failures"] = sum(r.get("failures", 0) + r.get("extension_load_failures", 0) for r in requests)
            parted = [
                agreement(ref["tokens"], ref["top"], run["tokens"], run["top"])
                for run, ref in zip(runs, references, strict=True)
            ]
            arms[arm.name] = ArmResult(
                arm=arm,
                exact=[float(run["tokens"] == ref["tokens"]) for run, ref in zip(runs, references, strict=True)],
                near_tie=[
                    float(run["tokens"] == ref["tokens"] or reason is None)
                    for run, ref, reason in zip(runs, references, parted, strict=True)
                ],
                parted=parted,
                rouge=[rouge_l(ref["tokens"], run["tokens"]) for run, ref in zip(runs, references, strict=True)],
                kl=[first_token_kl(ref["top"][0], run["top"][0]) for run, ref in zip(runs, references, strict=True)],
                delta_nll=[
                    statistics.mean(run["nll"]) - statistics.mean(ref["nll"])
                    for run, ref in zip(runs, references, strict=True)
                ],
                f1=[answer_f1(_answer(tokenizer, run["tokens"]), answers[i]) for run, i in zip(runs, ids, strict=True)],
                ttft=[statistics.median(run["ttft"]) for run in runs],
                blended=len(blends),
                requests=len(requests),
                counters=counters,
            )
        indices = np.random.default_rng(SEED).integers(0, len(ids), size=(RESAMPLES, len(ids)))
        intervals = {
            name: {
                "exact": bootstrap(result.exact, indices),
                "near_tie": bootstrap(result.near_tie, indices),
                "rouge_l": bootstrap(result.rouge, indices),
                "kl": bootstrap(result.kl, indices),
                "delta_nll": bootstrap(result.delta_nll, indices),
                "f1": bootstrap(result.f1, indices),
            }
            for name, result in arms.items()
        }
        intervals["full prefill"] = {"f1": bootstrap(full_f1, indices)}
        ingest = {
            "passages_cached_before": sum(served[i]["ingest"]["passages_held"] for i in ids),
            "ingests_blended": sum(served[i]["ingest"].get("blends", 0) for i in ids),
            "passages_saved": sum(served[i]["ingest"].get("saved_passages", 0) for i in ids)
            + sum(served[i]["flush"].get("saved_passages", 0) for i in ids),
        }
        probes = {
            "blended_prompt": sum(served[i]["probe"]["prompt"] or 0 for i in ids),
            "blended_teacher_forced": sum(served[i]["probe"]["teacher_forced"] or 0 for i in ids),
            "control_prompt": sum(served[i]["control"]["prompt"] or 0 for i in ids),
            "control_teacher_forced": sum(served[i]["control"]["teacher_forced"] or 0 for i in ids),
        }
        return cls(
            questions=len(ids),
            prompt_tokens=[len(prompt.prompt) for prompt in prompts],
            full_ttft=[statistics.median(full[i]["ttft"]) for i in ids],
            full_f1=full_f1,
            full_nll=[statistics.mean(full[i]["nll"]) for i in ids],
            arms=arms,
            ingest=ingest,
            probes=probes,
            intervals=intervals,
            indices=indices,
            cores={"full prefill": alone["cores"], "lmplug": blended["cores"]},
        )

    # ------------------------------------------------------------------ derived

    def ttft_ratio(self, name: str) -> float:
        """The median over questions of the arm's TTFT over full prefill's."""
        return _median([arm / full for arm, full in zip(self.arms[name].ttft, self.full_ttft, strict=True)])

    def paired(self, better: str, worse: str) -> Interval:
        """ROUGE-L of ``better`` less ``worse``, per question, with its interval."""
        a, b = self.arms[better].rouge, self.arms[worse].rouge
        return bootstrap([x - y for x, y in zip(a, b, strict=True)], self.indices)

    # ------------------------------------------------------------------ rows

    def rows(self) -> list[Result]:
        def one(value: float) -> Stats:
            return Stats.of([value])

        full = Stats.of(self.full_ttft).scaled(1e3)
        r1 = self.intervals[R1]
        rouge = {name: self.intervals[name]["rouge_l"] for name in self.arms}
        held = self.probes["blended_prompt"] + self.probes["blended_teacher_forced"]
        control = self.probes["control_prompt"] + self.probes["control_teacher_forced"]
        rows = [
            Result(NAME, "r=1: identical 32-token continuations", "%", one(r1["exact"].mean * 100), Target(">=", 99)),
            Result(NAME, f"r=1: identical or parted at a near tie ({NEAR_TIE})", "%", one(r1["near_tie"].mean * 100),
                   Target(">=", 99)),
            Result(NAME, f"r=0.15: ROUGE-L vs full prefill {rouge[R015].text()}", "", one(rouge[R015].mean),
                   Target(">=", 0.85)),
            Result(NAME, "r=0.15: ROUGE-L vs random r=0.15", "", one(rouge[R015].mean),
                   Target(">=", 1.0, relative=True), one(rouge[RANDOM].mean), "random"),
            Result(NAME, "r=0.15: ROUGE-L vs full reuse", "", one(rouge[R015].mean),
                   Target(">=", 1.0, relative=True), one(rouge[REUSE].mean), "full reuse"),
            Result(NAME, "r=0.15: TTFT", "ms", Stats.of(self.arms[R015].ttft).scaled(1e3),
                   Target("<=", 0.4, relative=True), full, "full prefill"),
            Result(NAME, "blended prompts: tokens lmplug's prefix lookup finds", "tok", one(held),
                   Target("<=", 0.0, relative=True), one(control), "stored prompt"),
        ]  # fmt: skip
        blend_arms = [arm for arm in self.arms.values() if arm.arm.spans]
        rows.append(
            Result(NAME, "blend arms: requests blended, every passage token reused", "req",
                   one(sum(arm.blended for arm in blend_arms)), Target(">=", 1.0, relative=True),
                   one(sum(arm.requests for arm in blend_arms)), "requests")
        )  # fmt: skip
        for name, arm in self.arms.items():
            intervals = self.intervals[name]
            rows += [
                Result(NAME, f"{name}: ROUGE-L {intervals['rouge_l'].text()}", "", one(intervals["rouge_l"].mean)),
                Result(NAME, f"{name}: delta NLL/token {intervals['delta_nll'].text()}", "nats",
                       one(intervals["delta_nll"].mean)),
                Result(NAME, f"{name}: TTFT", "ms", Stats.of(arm.ttft).scaled(1e3), None, full, "full prefill"),
            ]  # fmt: skip
        return rows

    # ------------------------------------------------------------------ details

    def details(self) -> str:
        tokens = self.prompt_tokens
        lines = [
            f"\n{NAME}: {self.questions} MuSiQue questions, prompts of {min(tokens)}-{max(tokens)} tokens "
            f"(median {statistics.median(tokens):.0f}), {PASSAGES} passages each, {ANSWER_TOKENS} greedy tokens",
            *(f"  {name}: {'; '.join(cores) or 'binding not logged'}" for name, cores in self.cores.items()),
            f"  full prefill: TTFT median {statistics.median(self.full_ttft) * 1e3:.0f} ms, "
            f"NLL of its continuation {statistics.mean(self.full_nll):.3f}/token, "
            f"gold-answer F1 {self.intervals['full prefill']['f1'].text()}",
            f"  ingest: {self.ingest['passages_saved']} passages cached, "
            f"{self.ingest['passages_cached_before']} already cached from an earlier question's prompt, "
            f"{self.ingest['ingests_blended']} ingests blended",
            f"  prefix lookups: blended prompts {self.probes['blended_prompt']} tokens, their teacher-forced prompts "
            f"{self.probes['blended_teacher_forced']}; after prefix-only stored them (control): "
            f"{self.probes['control_prompt']} and {self.probes['control_teacher_forced']}",
            "",
            "mean over questions [95% bootstrap interval]; TTFT: median over questions of the per-question median",
        ]
        header = ("arm", "EM", "EM or near tie", "ROUGE-L", "KL first token", "delta NLL/token", "gold F1", "TTFT ms",
                  "x full", "blended", "reused", "recomputed", "forced", "load+blend ms")  # fmt: skip
        table = [header]
        for name, arm in self.arms.items():
            intervals, counters = self.intervals[name], arm.counters
            table.append((
                name, intervals["exact"].text(2), intervals["near_tie"].text(2), intervals["rouge_l"].text(),
                intervals["kl"].text(4), intervals["delta_nll"].text(4), intervals["f1"].text(),
                f"{_median(arm.ttft) * 1e3:.0f}", f"{self.ttft_ratio(name):.2f}", f"{arm.blended}/{arm.requests}",
                f"{counters['reused_tokens']:.0f}", f"{counters['recomputed_tokens']:.0f}",
                f"{counters['forced_tokens']:.0f}",
                f"{(counters['load_seconds'] + counters['blend_seconds']) * 1e3:.0f}",
            ))  # fmt: skip
        widths = [max(len(row[column]) for row in table) for column in range(len(header))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in table]
        for name, arm in self.arms.items():
            phases = {
                key.removesuffix("_seconds"): value for key, value in arm.counters.items() if key.endswith("_seconds")
            }
            if arm.blended and phases:
                shown = ", ".join(f"{phase} {seconds * 1e3:.0f}" for phase, seconds in phases.items() if seconds)
                lines.append(f"  {name}: ms per request: {shown}")
        refused = {
            name: arm.counters for name, arm in self.arms.items() if arm.counters["rejected"] + arm.counters["failures"]
        }
        for name, counters in refused.items():
            lines.append(f"  {name}: {counters['rejected']:.0f} blends refused, {counters['failures']:.0f} failed")
        lines += [
            "",
            f"ROUGE-L, r=0.15 less random r=0.15: {self.paired(R015, RANDOM).text()}; "
            f"less full reuse: {self.paired(R015, REUSE).text()}",
            "counters: per request of the arm, mean (recomputed: reused tokens recomputed through the last layer; "
            "load: reading and moving passage KV; blend: the executor, of which project, select, write, attend, mlp)",
        ]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "questions": self.questions,
            "settings": {
                "passages": PASSAGES, "passage_tokens": PASSAGE_TOKENS, "answer_tokens": ANSWER_TOKENS, "top": TOP,
                "ttft_samples": TTFT_SAMPLES, "near_tie": NEAR_TIE, "resamples": RESAMPLES, "seed": SEED,
                "stack": STACK,
            },
            "cores": self.cores,
            "prompt_tokens": self.prompt_tokens,
            "full_prefill": {
                "ttft": self.full_ttft, "nll": self.full_nll, "f1": self.full_f1,
                "f1_interval": self.intervals["full prefill"]["f1"].as_json(),
            },
            "ingest": self.ingest,
            "prefix_lookups": self.probes,
            "arms": {
                name: {
                    "selection": arm.arm.selection,
                    "intervals": {key: value.as_json() for key, value in self.intervals[name].items()},
                    "ttft_median": _median(arm.ttft),
                    "ttft_ratio": self.ttft_ratio(name),
                    "blended_requests": arm.blended,
                    "requests": arm.requests,
                    "counters": arm.counters,
                    "per_question": {
                        "exact": arm.exact, "near_tie": arm.near_tie, "parted": arm.parted, "rouge_l": arm.rouge,
                        "kl": arm.kl, "delta_nll": arm.delta_nll, "f1": arm.f1, "ttft": arm.ttft,
                    },
                }
                for name, arm in self.arms.items()
            },
            "paired_rouge_l": {
                "r=0.15 - random": self.paired(R015, RANDOM).as_json(),
                "r=0.15 - full reuse": self.paired(R015, REUSE).as_json(),
            },
        }  # fmt: skip

    def plot(self, path: Path) -> None:
        """ROUGE-L, delta NLL and the TTFT ratio against r: HKVD as a curve, random, full reuse
        (r = 0) and prefix-only as markers."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hkvd = [arm for arm in self.arms.values() if arm.arm.name.startswith("hkvd")]
        xs = [arm.arm.ratio or 0.0 for arm in hkvd]
        figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for axis, key, label in ((axes[0], "rouge_l", "ROUGE-L vs full prefill"),
                                 (axes[1], "delta_nll", "teacher-forced delta NLL (nats/token)")):  # fmt: skip
            values = [self.intervals[arm.arm.name][key] for arm in hkvd]
            axis.plot(xs, [v.mean for v in values], "o-", label="HKVD (check layer 1)")
            axis.fill_between(xs, [v.low for v in values], [v.high for v in values], alpha=0.2)
            for name, marker in ((RANDOM, "s"), (REUSE, "^"), (PREFIX, "D")):
                interval = self.intervals[name][key]
                x = self.arms[name].arm.ratio if name != PREFIX else 1.04  # beside r = 1
                axis.errorbar([x], [interval.mean], [[interval.mean - interval.low], [interval.high - interval.mean]],
                              fmt=marker, capsize=3, label=name)  # fmt: skip
            axis.set(xlabel="recompute ratio r", ylabel=label)
        axes[0].axhline(0.85, color="grey", linestyle=":", linewidth=1)
        axes[0].legend(loc="lower right", fontsize=8)
        ratios = [self.ttft_ratio(arm.arm.name) for arm in hkvd]
        axes[2].plot(xs, ratios, "o-", label="HKVD")
        for name, marker in ((RANDOM, "s"), (REUSE, "^")):
            axes[2].plot([self.arms[name].arm.ratio], [self.ttft_ratio(name)], marker, label=name)
        axes[2].axhline(self.ttft_ratio(PREFIX), color="C3", linestyle="--", linewidth=1, label=PREFIX)
        axes[2].axhline(0.4, color="grey", linestyle=":", linewidth=1)
        axes[2].set(xlabel="recompute ratio r", ylabel="TTFT / full prefill (median over questions)", ylim=(0, None))
        axes[2].legend(loc="upper left", fontsize=8)
        figure.suptitle(f"CacheBlend on SmolLM2-135M in vLLM (CPU), {self.questions} MuSiQue questions")
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_blend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=QUESTIONS, help=f"MuSiQue questions (default {QUESTIONS})")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lmplug-vllm-blend",
                        help="where vllm_blend.json and vllm_blend.png go (default: under the temp dir)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.questions < 2:
        parser.error("--questions must be at least 2")
    results = measure(args.questions, args.out.resolve())
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
