"""Chunk codecs of shared stores (``lmplug_remote.codecs``): size, speed and error, against a same-run memcpy.

Geometry: one chunk of 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024) and 8 layers:
8 MiB (2 layers, 2 MiB with ``--quick``). Two samples of KV:

- ``randn``: ``torch.randn * 0.5``, no structure at all (the hardest case for compression).
- ``model-like``: what real K/V look like: per-channel magnitudes (log-normal, with a few
  outlier channels 10x the rest, as K has), a per-channel offset, values drifting slowly
  along the tokens (an AR(1) process), and V smaller and smoother than K.

Per codec and sample (each codec object called directly, one thread, no tier around it):

- ratio: KV bytes / encoded bytes (header included).
- encode, decode: MiB of KV per second, next to ``dst.copy_(src)`` of the same bytes between
  preallocated tensors (the same-run memcpy reference).
- lossy codecs only: max abs error, RMS error relative to the RMS of the KV, and the cosine
  similarity of attention scores ``q . k`` computed with the original and with the decoded K
  for random queries (8 per head, ``q ~ N(0, 1)``), per (layer, head, query) row of scores
  over the tokens, reported as ``1 - cosine`` in parts per million (0 is no change): the mean and the worst row.

``lz4-plain`` and ``zstd-plain`` are the registered codecs without the byte shuffle, for the
comparison. All rows are info rows: there is no target (findings are in the lmplug-remote README).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import lmplug
import lmplug.tierkit
from benchmarks.harness import MiB, Result, Settings, Stats, sample_sync
from lmplug_remote.codecs import Fp8Codec, Int8Codec, Lz4Codec, ZstdCodec

NAME = "remote_codecs"
SUMMARY = "shared-store chunk codecs (lz4, zstd, int8, fp8): ratio, MiB/s vs memcpy, error (info)"

CHUNK_TOKENS = 256
KV_HEADS = 8
HEAD_SIZE = 128
QUERIES = 8
CODECS: tuple[lmplug.tierkit.ChunkCodec, ...] = (
    Lz4Codec(),
    ZstdCodec(),
    Int8Codec(),
    Fp8Codec(),
    Lz4Codec(shuffle=False, name="lz4-plain"),
    ZstdCodec(shuffle=False, name="zstd-plain"),
)


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 0.5).to(torch.bfloat16)


def _model_like(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    _, layers, tokens, hidden = shape
    magnitude = torch.exp(torch.randn(2, layers, 1, hidden, generator=generator) * 0.5)
    outliers = torch.rand(1, layers, 1, hidden, generator=generator) < 0.02
    magnitude[0:1] = torch.where(outliers, magnitude[0:1] * 10, magnitude[0:1])  # K's outlier channels
    magnitude[1] *= 0.3  # V is smaller than K
    offset = torch.randn(2, layers, 1, hidden, generator=generator) * magnitude * 0.5
    noise = torch.randn(shape, generator=generator)
    drift = torch.empty(shape)
    drift[:, :, 0] = noise[:, :, 0]
    for token in range(1, tokens):  # AR(1) along the tokens: neighbouring tokens are alike
        drift[:, :, token] = 0.9 * drift[:, :, token - 1] + 0.44 * noise[:, :, token]
    return (offset + magnitude * drift).to(torch.bfloat16)


SAMPLES: dict[str, Callable[[tuple[int, ...], torch.Generator], torch.Tensor]] = {
    "randn": _randn,
    "model-like": _model_like,
}


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _attention_cosine(original: torch.Tensor, decoded: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
    """Mean and worst cosine similarity of ``q . k`` rows computed with the original and the decoded K."""
    _, layers, tokens, hidden = original.shape
    heads = hidden // HEAD_SIZE
    k = original[0].float().reshape(layers, tokens, heads, HEAD_SIZE).transpose(1, 2)
    k_decoded = decoded[0].float().reshape(layers, tokens, heads, HEAD_SIZE).transpose(1, 2)
    q = torch.randn(layers, heads, QUERIES, HEAD_SIZE, generator=generator)
    scores = q @ k.transpose(-1, -2)
    scores_decoded = q @ k_decoded.transpose(-1, -2)
    cosine = torch.nn.functional.cosine_similarity(scores.double(), scores_decoded.double(), dim=-1)
    return float(cosine.mean()), float(cosine.min())


def _one(value: float) -> Stats:
    return Stats.of([value])


def _measure(sample: str, kv: torch.Tensor, settings: Settings) -> list[Result]:
    nbytes = kv.nbytes
    mib = nbytes / MiB
    copy_target = torch.empty_like(kv)
    copy_target.copy_(kv)  # faulted in
    outs = {codec.name: torch.empty_like(kv) for codec in CODECS}
    encoded = {codec.name: codec.encode(kv) for codec in CODECS}

    cases: dict[str, Callable[[], float]] = {"memcpy": lambda: _timed(lambda: copy_target.copy_(kv))}
    for codec in CODECS:
        data, out = encoded[codec.name], outs[codec.name]
        cases[f"encode {codec.name}"] = lambda codec=codec: _timed(lambda: codec.encode(kv))  # type: ignore[misc]
        cases[f"decode {codec.name}"] = lambda codec=codec, data=data, out=out: _timed(  # type: ignore[misc]
            lambda: codec.decode(data, out)
        )
    stats = {name: value.inverted(mib) for name, value in sample_sync(cases, settings).items()}
    memcpy = stats["memcpy"]

    label = f"{sample} bf16 {mib:g} MiB"
    results: list[Result] = []
    generator = torch.Generator().manual_seed(7)
    for codec in CODECS:
        name = codec.name
        results += [
            Result(NAME, f"{name} ratio {label}", "x", _one(nbytes / len(encoded[name]))),
            Result(NAME, f"{name} encode {label}", "MiB/s", stats[f"encode {name}"], None, memcpy, "memcpy"),
            Result(NAME, f"{name} decode {label}", "MiB/s", stats[f"decode {name}"], None, memcpy, "memcpy"),
        ]
        decoded = outs[name]
        if not codec.lossy:
            if not torch.equal(decoded.view(torch.uint8), kv.view(torch.uint8)):
                raise RuntimeError(f"lossless codec {name} changed the KV")
            continue
        error = decoded.double() - kv.double()
        relative = float(error.square().mean().sqrt() / kv.double().square().mean().sqrt())
        mean_cosine, worst_cosine = _attention_cosine(kv, decoded, generator)
        results += [
            Result(NAME, f"{name} max abs error {label}", "", _one(float(error.abs().max()))),
            Result(NAME, f"{name} RMS relative error {label}", "%", _one(100 * relative)),
            Result(NAME, f"{name} q.k 1-cosine mean {label}", "ppm", _one(1e6 * (1 - mean_cosine))),
            Result(NAME, f"{name} q.k 1-cosine worst row {label}", "ppm", _one(1e6 * (1 - worst_cosine))),
        ]
    return results


def run(settings: Settings) -> list[Result]:
    layers = 2 if settings.quick else 8
    shape = (2, layers, CHUNK_TOKENS, KV_HEADS * HEAD_SIZE)
    results: list[Result] = []
    for sample, make in SAMPLES.items():
        kv = make(shape, torch.Generator().manual_seed(0))
        results += _measure(sample, kv, settings)
    return results
