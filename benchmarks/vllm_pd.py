"""Prefill/decode disaggregation on real vLLM: running decodes while long prompts arrive.

Two set-ups on the same two cores, one after the other, each serving SmolLM2 (real weights,
``vllm serve``, vLLM's own prefix cache off):

- ``one instance``: one vLLM on both cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``), no lmplug:
  what a user runs without PD;
- ``PD``: a prefill instance on core 0 and a decode instance on core 1, each with lmplug
  (``cpu`` and ``pd`` tiers), behind ``lmplug-pd-proxy``.

The workload, the same for both, through their OpenAI endpoint (the proxy for PD):

- 3 running decodes: streamed completions of short prompts (about 200 tokens), 160 output
  tokens each (``ignore_eos``), started together;
- long prompts arriving meanwhile: from 1 s after the decodes start, a new prompt of about
  3,000 tokens every 2.5 s (8 output tokens each, not streamed), distinct from each other,
  until the decodes end.

Rows: the mean inter-token latency (ITL) of the running decodes (time between their streamed
tokens), PD against one instance (target <= 0.7x), with p50 and p99 as info; the TTFT of the
long prompts (info); and the prompt tokens the decode instance computed itself for each
transferred prompt (the prompt length less the ``loaded_tokens`` its connector reports; target
<= 1). About 4 minutes on two cores, so ``--quick`` skips it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.harness import Result, Settings, Stats, Target

NAME = "vllm_pd"
SUMMARY = "PD (prefill + decode instance, a core each) vs one vLLM on both cores: ITL of running decodes (<= 0.7x)"
ROOT = Path(__file__).resolve().parents[1]
LICENSE = Path("/usr/share/common-licenses/GPL-3")
START_LIMIT = 600.0

DECODES = 3
DECODE_TOKENS = 160
LONG_EVERY = 2.5
LONG_WORDS = 2100
LONG_TOKENS_OUT = 8


def _post(url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Seconds to the whole answer (non-streamed, so TTFT plus 7 tokens), and the answer."""
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return time.perf_counter() - started, answer


def _stream_times(url: str, body: dict[str, Any]) -> list[float]:
    """Arrival times of each streamed token event."""
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
    )
    times = []
    with urllib.request.urlopen(request, timeout=600) as reply:
        for line in reply:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
    return times


def _words(start: int, count: int) -> str:
    return " ".join(LICENSE.read_text().split()[start : start + count])


def _workload(url: str) -> dict[str, Any]:
    """Run the workload against ``url``; the decodes' token times and the long prompts' answers."""
    decodes: list[list[float]] = [[] for _ in range(DECODES)]
    longs: list[tuple[float, dict[str, Any]]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def decode(index: int) -> None:
        body = {
            "model": "smollm2", "prompt": f"Story {index}: " + _words(4000 + 150 * index, 140),
            "max_tokens": DECODE_TOKENS, "ignore_eos": True, "temperature": 0,
        }  # fmt: skip
        try:
            decodes[index] = _stream_times(url, body)
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    def long(index: int) -> None:
        body = {
            "model": "smollm2", "prompt": f"Document {index}:\n" + _words(97 * index, LONG_WORDS) + "\nSummary:",
            "max_tokens": LONG_TOKENS_OUT, "ignore_eos": True, "temperature": 0,
        }  # fmt: skip
        try:
            longs.append(_post(url, body))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=decode, args=(index,)) for index in range(DECODES)]
    for thread in threads:
        thread.start()
    arrivals: list[threading.Thread] = []
    done.wait(1.0)
    while any(thread.is_alive() for thread in threads):
        arrival = threading.Thread(target=long, args=(len(arrivals),))
        arrival.start()
        arrivals.append(arrival)
        done.wait(LONG_EVERY)
    for thread in [*threads, *arrivals]:
        thread.join(timeout=900)
    if errors:
        raise RuntimeError(f"vllm_pd: {len(errors)} requests failed; the first: {errors[0]!r}")
    return {"decodes": decodes, "longs": longs}


def _gaps(decodes: list[list[float]]) -> list[float]:
    return [later - earlier for times in decodes for earlier, later in itertools.pairwise(times)]


def _one_instance(model: Path, work: Path) -> dict[str, Any]:
    from lmplug.testing.vllm_serve import start_vllm_serve, wait_healthy

    engine = start_vllm_serve("one", model, work, served_name="smollm2", stack=None, cores="0-1", max_model_len=4096)
    try:
        wait_healthy([engine], START_LIMIT)
        _post(engine.url, {"model": "smollm2", "prompt": "Warm up.", "max_tokens": 4})
        return _workload(engine.url)
    finally:
        engine.stop()


def _pd(model: Path, work: Path) -> dict[str, Any]:
    from lmplug.testing import free_port
    from lmplug.testing.vllm_serve import healthy, start_vllm_serve, wait_healthy

    port = free_port()
    stack = "chunk_size: 256\nsave_partial_chunks: true\ntiers:\n  - {type: cpu, capacity: 2GiB}\n"
    settings: dict[str, Any] = {"served_name": "smollm2", "max_model_len": 4096}
    prefill = start_vllm_serve("prefill", model, work, stack=stack + "  - {type: pd}\n", cores="0", **settings)
    decode = start_vllm_serve(
        "decode", model, work, stack=stack + f"  - {{type: pd, port: {port}}}\n", cores="1", **settings
    )
    proxy_port = free_port()
    with (work / "proxy.log").open("w") as log:
        proxy = subprocess.Popen(
            [
                sys.executable, "-c", "import sys; from lmplug_pd.cli import main; sys.exit(main())",
                "--prefill", prefill.url, "--decode", f"{decode.url}=127.0.0.1:{port}", "--port", str(proxy_port),
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{proxy_port}"
    try:
        wait_healthy([prefill, decode], START_LIMIT)
        while not healthy(f"{url}/health"):
            if proxy.poll() is not None:
                raise RuntimeError((work / "proxy.log").read_text())
            time.sleep(0.2)
        _post(url, {"model": "smollm2", "prompt": "Warm up.", "max_tokens": 4})
        report = _workload(url)
        report["decode_statistics"] = decode.statistics()["transfers"]
        report["prefill_statistics"] = prefill.statistics()["transfers"]
        return report
    finally:
        if proxy.poll() is None:
            os.killpg(proxy.pid, signal.SIGTERM)
        prefill.stop()
        decode.stop()
        proxy.wait(timeout=60)


def run(settings: Settings) -> list[Result]:
    if settings.quick:
        print("  vllm_pd: skipped with --quick (three vLLM processes, several minutes)", file=sys.stderr)
        return []
    try:
        import vllm  # noqa: F401

        import lmplug_pd  # noqa: F401
    except ImportError:
        return []
    from lmplug import models

    model = models.build("smollm2")
    with tempfile.TemporaryDirectory(prefix=".bench-pd-") as scratch:
        one = _one_instance(model, Path(scratch) / "one")
        pd = _pd(model, Path(scratch) / "pd")
    one_gaps, pd_gaps = _gaps(one["decodes"]), _gaps(pd["decodes"])
    ms = 1000.0

    def per_stream_means(report: dict[str, Any]) -> Stats:
        return Stats.of([statistics.fmean(_gaps([times])) * ms for times in report["decodes"]])

    def quantile(gaps: list[float], q: float) -> Stats:
        ordered = sorted(gaps)
        return Stats.of([ordered[min(len(ordered) - 1, int(q * len(ordered)))] * ms])

    computed = []
    for _, answer in pd["longs"]:
        status = answer["kv_transfer_params"]["lmplug"]["pd"]
        computed.append(float(answer["usage"]["prompt_tokens"] - status["loaded_tokens"]))
    print(
        f"  vllm_pd: {len(one['longs'])} / {len(pd['longs'])} long prompts arrived (one instance / PD); "
        f"decode instance: {pd['decode_statistics']}",
        file=sys.stderr,
    )
    return [
        Result(NAME, f"mean ITL of {DECODES} running decodes while long prompts arrive, PD", "ms",
               per_stream_means(pd), Target("<=", 0.7, relative=True), per_stream_means(one), "one instance"),
        Result(NAME, "p50 ITL, PD", "ms", quantile(pd_gaps, 0.5), None, quantile(one_gaps, 0.5), "one instance"),
        Result(NAME, "p99 ITL, PD", "ms", quantile(pd_gaps, 0.99), None, quantile(one_gaps, 0.99), "one instance"),
        Result(NAME, f"long prompts ({LONG_TOKENS_OUT} tokens out): time to the answer, PD", "s",
               Stats.of([seconds for seconds, _ in pd["longs"]]), None,
               Stats.of([seconds for seconds, _ in one["longs"]]), "one instance"),
        Result(NAME, "prompt tokens the decode instance computed per transferred prompt", "tok",
               Stats.of(computed), Target("<=", 1.0, relative=False)),
    ]  # fmt: skip
