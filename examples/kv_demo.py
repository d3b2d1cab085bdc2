"""The main job until the vLLM integration lands: a multi-round chat workload on real KV.

Several users share a system prompt and grow their conversations round by round. For
each request the "engine" asks lmplug how much of the prompt it holds, retrieves that
KV, and computes KV only for the rest with a small causal transformer-like prefill that
reads the retrieved KV as attention does (real tensor work, so skipped tokens are skipped
work). It checks that the retrieved KV and the KV it computed equal a full recomputation
byte for byte, and stores the new KV. Per round it prints hit rates, the measured time
of a full prefill and the time the cache saved (a full prefill's time less the cache's
and the rest's), and store/retrieve throughput against a same-run memcpy of the same bytes.

    python examples/kv_demo.py                 # configs/default.yaml
    python examples/kv_demo.py --config my.yaml --users 8 --rounds 6
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import torch

import lmplug
from lmplug.core.layout import DTYPES
from lmplug.core.memory import empty_kv

ROOT = Path(__file__).resolve().parents[1]


ROWS = 256
"""Tokens per matrix product of :class:`TinyPrefill`: token ``t``'s row is row ``t % ROWS`` of a
product of the same shape whatever the prompt's length and wherever the computation starts, on
one thread, so a token's KV is the same bits computed alone, after a cached prefix, or inside a
longer prompt (a matrix product's rounding may depend on its shape and on how many threads the
BLAS picks, which varies with the machine's load: a loaded machine once made every comparison
of a run fail)."""


class TinyPrefill:
    """KV for a token sequence, layer by layer: each token's state mixes its own with the mean of
    the values (the V half of the KV) of the tokens up to it, as attention would (deterministic).

    Like an engine's prefill it needs, besides the new tokens, only the KV of the tokens before
    them, so with a cached prefix it computes the rest alone.
    """

    def __init__(self, config: lmplug.LmplugConfig, vocab: int = 32_000, width: int = 256) -> None:
        generator = torch.Generator().manual_seed(0)
        model = config.model
        self.hidden = model.num_kv_heads * model.head_size
        self.dtype = DTYPES[model.dtype]
        self.embed = torch.randn(vocab, width, generator=generator)
        self.mix = [
            torch.randn(width + self.hidden, width, generator=generator) / (width + self.hidden) ** 0.5
            for _ in range(model.num_layers)
        ]
        self.kv = torch.randn(model.num_layers, 2, width, self.hidden, generator=generator) / width**0.5
        self.vocab = vocab

    def __call__(self, tokens: torch.Tensor, prefix_kv: torch.Tensor) -> torch.Tensor:
        """KV ``[2, layers, n - p, hidden]`` of ``tokens[p:]``, given ``prefix_kv``, the KV of
        ``tokens[:p]`` (``p`` may be 0: a full prefill)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._prefill(tokens, prefix_kv)
        finally:
            torch.set_num_threads(threads)

    def _prefill(self, tokens: torch.Tensor, prefix_kv: torch.Tensor) -> torch.Tensor:
        first = prefix_kv.shape[2]
        x = self.embed[tokens[first:] % self.vocab]
        positions = torch.arange(first + 1, len(tokens) + 1, dtype=torch.float64).unsqueeze(1)
        layers = []
        for layer, (mix, kv) in enumerate(zip(self.mix, self.kv, strict=True)):
            keys, values = _rows(x, kv[0], first).to(self.dtype), _rows(x, kv[1], first).to(self.dtype)
            # The running sum of the values: one sequential float64 scan, which the prefix's KV
            # resumes exactly where a full prefill would be (the same additions in the same order).
            before = torch.cumsum(prefix_kv[1, layer].double(), 0)[-1:] if first else torch.zeros(1, self.hidden)
            sums = torch.cumsum(torch.cat([before.double(), values.double()]), 0)[1:]
            context = (sums / positions).float()  # causal: token t sees tokens <= t
            x = torch.tanh(_rows(torch.cat([x, context], dim=1), mix, first))
            layers.append(torch.stack([keys, values]))
        return torch.stack(layers, dim=1)


def _rows(x: torch.Tensor, weight: torch.Tensor, first: int) -> torch.Tensor:
    """``x @ weight`` where ``x``'s rows are tokens ``first, first + 1, ...``: token ``t`` is row
    ``t % ROWS`` of a product of :data:`ROWS` rows (the others zero)."""
    count = x.shape[0]
    offset = first % ROWS
    padded = torch.zeros(-(-(offset + count) // ROWS) * ROWS, x.shape[1], dtype=x.dtype)
    padded[offset : offset + count] = x
    products = [padded[start : start + ROWS] @ weight for start in range(0, len(padded), ROWS)]
    return torch.cat(products)[offset : offset + count]


@dataclass
class RoundStats:
    requests: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    cache_seconds: float = 0.0
    compute_seconds: float = 0.0
    full_compute_seconds: float = 0.0
    stored_bytes: int = 0
    store_seconds: float = 0.0
    retrieved_bytes: int = 0
    retrieve_seconds: float = 0.0
    wrong: list[str] = field(default_factory=list)


def memcpy_gbps(nbytes: int) -> float:
    """Same-run reference: copying ``nbytes`` between two preallocated host buffers."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def make_conversations(users: int, rounds: int, system_tokens: int, turn_tokens: int) -> list[list[list[int]]]:
    generator = torch.Generator().manual_seed(1)
    system = torch.randint(0, 32_000, (system_tokens,), generator=generator).tolist()
    conversations = []
    for _ in range(users):
        history = list(system)
        prompts = []
        for _ in range(rounds):
            history += torch.randint(0, 32_000, (turn_tokens,), generator=generator).tolist()
            prompts.append(list(history))
            history += torch.randint(0, 32_000, (turn_tokens // 2,), generator=generator).tolist()  # the answer
        conversations.append(prompts)
    return conversations


async def serve(cache: lmplug.Cache, prefill: TinyPrefill, tokens: list[int], stats: RoundStats) -> None:
    ids = torch.tensor(tokens)
    start = time.perf_counter()
    cached = await cache.lookup(ids)
    kv_cached, cached = await cache.retrieve(ids[:cached])
    middle = time.perf_counter()
    rest = prefill(ids, kv_cached)  # what an engine computes: the tokens after the cached ones
    end = time.perf_counter()
    full = prefill(ids, kv_cached[:, :, :0])  # without lmplug: the whole prompt (and the reference)
    stats.full_compute_seconds += time.perf_counter() - end
    stats.cache_seconds += middle - start
    stats.compute_seconds += end - middle
    stats.retrieve_seconds += middle - start
    stats.retrieved_bytes += cached * cache.layout.bytes_per_token
    if not torch.equal(kv_cached, full[:, :, :cached]):
        stats.wrong.append(f"{len(tokens)}-token prompt: retrieved KV differs from recomputation")
    if not torch.equal(rest, full[:, :, cached:]):
        stats.wrong.append(f"{len(tokens)}-token prompt: KV computed after the cached prefix differs from it")
    start = time.perf_counter()
    await cache.store(ids, torch.cat([kv_cached, rest], dim=2))
    stats.store_seconds += time.perf_counter() - start
    stats.stored_bytes += (len(tokens) - cached) * cache.layout.bytes_per_token
    stats.requests += 1
    stats.prompt_tokens += len(tokens)
    stats.hit_tokens += cached


async def run(args: argparse.Namespace) -> int:
    config = lmplug.load_config(args.config)
    prefill = TinyPrefill(config)
    conversations = make_conversations(args.users, args.rounds, args.system_tokens, args.turn_tokens)
    print(f"lmplug demo: {args.users} users x {args.rounds} rounds, config {args.config}")
    print(f"  stack: {', '.join(f'{t.tier_name} ({t.type})' for t in config.tiers)}; chunk {config.chunk_size} tokens")
    async with lmplug.open_cache(config) as cache:
        reference = memcpy_gbps(config.chunk_size * cache.layout.bytes_per_token * 8)
        print(
            f"  KV: {cache.layout.describe()}, {cache.layout.bytes_per_token} bytes/token; memcpy {reference:.1f} GB/s"
        )
        header = (
            f"{'round':>5} {'reqs':>4} {'prompt tok':>10} {'hit tok':>8} {'hit %':>6} "
            f"{'prefill s':>9} {'saved s':>8} {'get GB/s':>8} {'put GB/s':>8}"
        )
        print(header)
        print("-" * len(header))
        prefill(torch.zeros(ROWS, dtype=torch.long), empty_kv(cache.layout, 0))  # warm, as a serving engine is
        total = RoundStats()
        for round_index in range(args.rounds):
            stats = RoundStats()
            for user in conversations:
                await serve(cache, prefill, user[round_index], stats)
            saved = stats.full_compute_seconds - stats.compute_seconds - stats.cache_seconds
            get = stats.retrieved_bytes / stats.retrieve_seconds / 1e9 if stats.retrieved_bytes else 0.0
            put = stats.stored_bytes / stats.store_seconds / 1e9 if stats.store_seconds else 0.0
            print(
                f"{round_index + 1:>5} {stats.requests:>4} {stats.prompt_tokens:>10} {stats.hit_tokens:>8} "
                f"{100 * stats.hit_tokens / stats.prompt_tokens:>5.1f}% {stats.full_compute_seconds:>9.3f} "
                f"{saved:>8.3f} {get:>8.2f} {put:>8.2f}",
                flush=True,
            )
            for name in ("requests", "prompt_tokens", "hit_tokens", "cache_seconds", "compute_seconds"):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            total.full_compute_seconds += stats.full_compute_seconds
            total.wrong += stats.wrong
        with_cache = total.cache_seconds + total.compute_seconds
        print("-" * len(header))
        print(
            f"hit rate {100 * total.hit_tokens / total.prompt_tokens:.1f}% of {total.prompt_tokens} prompt tokens; "
            f"prefill work {total.full_compute_seconds:.2f} s without lmplug, {with_cache:.2f} s with it "
            f"({total.full_compute_seconds / with_cache:.1f}x less)"
        )
        for tier in cache.statistics().tiers:
            print(
                f"tier {tier.name}: {tier.chunks} chunks, {tier.used_bytes / 2**20:.1f} MiB used, "
                f"{tier.hits} chunk hits, {tier.evictions} evictions"
            )
        if total.wrong:
            print(f"WRONG KV served {len(total.wrong)} times: {total.wrong[0]}")
            return 1
        print("every retrieved KV matched a full recomputation byte for byte")
        print("every KV computed after a cached prefix matched it too")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="lmplug YAML config")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=2048, help="shared system prompt length")
    parser.add_argument("--turn-tokens", type=int, default=512, help="tokens each user adds per round")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    return anyio.run(run, args, backend=args.backend)


if __name__ == "__main__":
    raise SystemExit(main())
