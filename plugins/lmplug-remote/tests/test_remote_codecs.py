"""The chunk codecs (lz4, zstd, int8, fp8): round trips, error bounds, damaged input, and the remote tier.

Error bounds of the lossy codecs, per value ``x`` of a group whose largest finite magnitude
is ``amax`` (see ``lmplug_remote.codecs``): the stored scale ``s`` lies in
``[amax / qmax, amax / qmax * (1 + 2**-7) + 2**-133]`` (``amax / qmax`` rounded up to bfloat16), and

- int8 (qmax 127):  ``|x - x'| <= s / 2``
- fp8 (qmax 448):   ``|x - x'| <= |x| / 16 + s / 1024``  (e4m3: 3 mantissa bits, subnormal step ``2**-9``)

plus the rounding of ``x'`` to the chunk's dtype: ``eps / 2 * |x'|``, or half a subnormal step.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lmplug
import lmplug.tierkit
from lmplug.testing import reference_kv
from lmplug.tierkit import ChunkCodec
from lmplug_remote.codecs import GROUP, CodecHeader, Fp8Codec, Int8Codec, Lz4Codec, ZstdCodec, default_codecs

from remote_testing import STORES, dict_host, remote_tier, two_tier_config

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOSSLESS = (Lz4Codec(), ZstdCodec(), Lz4Codec(shuffle=False), ZstdCodec(shuffle=False))
LOSSY = (Int8Codec(), Fp8Codec())
CODECS = (*LOSSLESS, *LOSSY)


def codec_id(codec: ChunkCodec) -> str:
    plain = getattr(codec, "shuffle", True) is False
    return codec.name + ("-plain" if plain else "")


def error_bound(codec: ChunkCodec, kv: torch.Tensor) -> torch.Tensor:
    """The largest error the codec may make at each value of the (finite) ``kv``, from the bounds above."""
    x = kv.double()
    group = GROUP if kv.shape[-1] % GROUP == 0 else kv.shape[-1]
    groups = x.abs().reshape(-1, group)
    amax = torch.where(torch.isfinite(groups), groups, 0).amax(dim=1, keepdim=True)
    scale = amax / (127 if codec.name == "int8" else 448) * (1 + 2**-7) + 2**-133  # + bfloat16's subnormal step
    scale = scale.expand_as(groups).reshape(x.shape)
    quantized = scale / 2 if codec.name == "int8" else x.abs() / 16 + scale / 1024
    info = torch.finfo(kv.dtype)
    rounding = info.eps / 2 * (x.abs() + quantized) + info.tiny * info.eps
    return quantized * (1 + 1e-4) + rounding  # 1e-4: float32 rounding of x / s


def round_trip(codec: ChunkCodec, kv: torch.Tensor) -> tuple[memoryview, torch.Tensor]:
    encoded = codec.encode(kv)
    assert len(encoded) <= codec.max_encoded_size(kv.shape, kv.dtype)
    out = torch.full_like(kv, 12345.0)
    codec.decode(encoded, out)
    return encoded, out


def kv_like_model(dtype: torch.dtype, tokens: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    channel = torch.rand(1, 1, 1, 256, generator=generator) * 3 + 0.1  # per-channel magnitudes, as real K has
    return (torch.randn(2, 3, tokens, 256, generator=generator) * channel).to(dtype)


def test_plugin_registers_the_codecs() -> None:
    codecs = lmplug.PluginHost.from_environment({}).codecs
    assert {"raw", "lz4", "zstd", "int8", "fp8"} <= set(codecs)
    assert [codecs[name].lossy for name in ("lz4", "zstd", "int8", "fp8")] == [False, False, True, True]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", LOSSLESS, ids=codec_id)
@pytest.mark.parametrize("tokens", [16, 5])
def test_lossless_codecs_return_the_same_bytes(codec: ChunkCodec, dtype: torch.dtype, tokens: int) -> None:
    kv = kv_like_model(dtype, tokens)
    encoded, out = round_trip(codec, kv)
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))
    if codec.name == "zstd" and getattr(codec, "shuffle", False):
        assert len(encoded) < kv.nbytes  # model-like KV compresses (lz4 may store it as it is)


@pytest.mark.parametrize("codec", LOSSLESS, ids=codec_id)
def test_incompressible_bytes_are_stored_within_the_bound(codec: ChunkCodec) -> None:
    kv = torch.randint(0, 256, (2, 2, 8, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    kv = kv.view(torch.bfloat16)
    encoded, out = round_trip(codec, kv)
    assert len(encoded) == codec.max_encoded_size(kv.shape, kv.dtype)
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", LOSSY, ids=codec_id)
@pytest.mark.parametrize("tokens", [16, 5])
def test_lossy_codecs_stay_within_their_error_bound(codec: ChunkCodec, dtype: torch.dtype, tokens: int) -> None:
    kv = kv_like_model(dtype, tokens)
    encoded, out = round_trip(codec, kv)
    assert len(encoded) == codec.max_encoded_size(kv.shape, dtype)
    assert len(encoded) == CodecHeader.SIZE + kv.numel() * (1 + 2 / GROUP)  # a byte a value, bfloat16 scales
    error = (out.double() - kv.double()).abs()
    assert bool((error <= error_bound(codec, kv)).all())
    assert error.max() > 0  # it did quantize


@pytest.mark.parametrize("codec", LOSSY, ids=codec_id)
def test_zero_groups_are_exact_and_constant_groups_within_bound(codec: ChunkCodec) -> None:
    kv = torch.zeros(2, 2, 3, 128, dtype=torch.bfloat16)
    kv[1, 0, 1, :64] = 3.5  # constant groups: their values land next to the largest code
    kv[1, 1, 2, 64:] = -0.25
    _, out = round_trip(codec, kv)
    assert torch.equal(out[kv == 0], kv[kv == 0])
    assert bool(((out.double() - kv.double()).abs() <= error_bound(codec, kv)).all())
    assert out[1, 0, 1, :64].unique().numel() == 1


@pytest.mark.parametrize("codec", LOSSY, ids=codec_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_values_at_the_dtype_limit_do_not_overflow(codec: ChunkCodec, dtype: torch.dtype) -> None:
    limit = torch.finfo(dtype).max
    kv = torch.full((2, 1, 1, 64), limit, dtype=dtype)
    kv[0, 0, 0, 1::2] = -limit
    kv[1, 0, 0, 3] = limit / 3
    _, out = round_trip(codec, kv)
    assert bool(torch.isfinite(out).all())
    assert bool(((out.double() - kv.double()).abs() <= error_bound(codec, kv)).all())


@pytest.mark.parametrize("codec", LOSSY, ids=codec_id)
def test_lossy_codecs_decode_non_finite_values_as_nan(codec: ChunkCodec) -> None:
    kv = kv_like_model(torch.float32, 4)
    kv[0, 0, 0, 3] = torch.inf
    kv[0, 1, 2, 70] = -torch.inf
    kv[1, 2, 3, 200] = torch.nan
    kv[1, 0, 0, :64] = torch.inf  # a group with nothing finite
    _, out = round_trip(codec, kv)
    finite = torch.isfinite(kv)
    assert torch.equal(torch.isnan(out), ~finite)
    # the group's finite values keep their bound: the scale ignores the infinities
    error = (out.double() - kv.double()).abs()[finite]
    assert bool((error <= error_bound(codec, kv)[finite]).all())


def test_fp8_decoding_matches_torchs_float8_cast_for_every_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(4, 64)
    expected = codes.view(torch.float8_e4m3fn).to(torch.float32)
    decoded = Fp8Codec()._dequantize(codes, torch.ones(4), nonfinite=True)
    assert torch.equal(torch.isnan(decoded), torch.isnan(expected))
    assert torch.equal(decoded.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("codec", LOSSLESS, ids=codec_id)
def test_lossless_codecs_keep_non_finite_values(codec: ChunkCodec) -> None:
    kv = kv_like_model(torch.bfloat16, 4)
    kv[0, 0, 0, :3] = torch.tensor([torch.inf, -torch.inf, torch.nan])
    _, out = round_trip(codec, kv)
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


# ---------------------------------------------------------------------------- damaged and foreign input


@pytest.mark.parametrize("codec", CODECS, ids=codec_id)
def test_truncated_input_is_corrupt(codec: ChunkCodec) -> None:
    kv = kv_like_model(torch.bfloat16, 8)
    encoded = bytes(codec.encode(kv))
    for keep in (0, 10, CodecHeader.SIZE - 1, CodecHeader.SIZE, len(encoded) // 2, len(encoded) - 1):
        with pytest.raises(lmplug.CorruptChunk):
            codec.decode(memoryview(encoded[:keep]), torch.empty_like(kv))
    with pytest.raises(lmplug.CorruptChunk):
        codec.decode(memoryview(encoded + b"\0"), torch.empty_like(kv))


@pytest.mark.parametrize("codec", CODECS, ids=codec_id)
def test_any_damaged_header_byte_is_corrupt(codec: ChunkCodec) -> None:
    kv = kv_like_model(torch.float16, 4)
    encoded = bytearray(codec.encode(kv))
    for index in range(CodecHeader.SIZE):
        damaged = bytearray(encoded)
        damaged[index] ^= 0x01
        with pytest.raises(lmplug.CorruptChunk):
            codec.decode(memoryview(damaged), torch.empty_like(kv))


@pytest.mark.parametrize("codec", CODECS, ids=codec_id)
def test_another_shape_or_dtype_is_corrupt(codec: ChunkCodec) -> None:
    kv = kv_like_model(torch.bfloat16, 8)
    encoded = codec.encode(kv)
    for out in (
        torch.empty(2, 3, 7, 256, dtype=torch.bfloat16),  # fewer tokens
        torch.empty(2, 3, 8, 256, dtype=torch.float16),  # same size, another dtype
        torch.empty(2, 3, 16, 128, dtype=torch.bfloat16),  # same size, another hidden
    ):
        with pytest.raises(lmplug.CorruptChunk, match="made for"):
            codec.decode(encoded, out)


@pytest.mark.parametrize("reader", CODECS, ids=codec_id)
def test_another_codecs_bytes_are_corrupt(reader: lmplug.tierkit.ChunkCodec) -> None:
    kv = kv_like_model(torch.bfloat16, 8)
    for writer in [*default_codecs(), lmplug.tierkit.RawCodec()]:
        if writer.name == reader.name:
            continue
        with pytest.raises(lmplug.CorruptChunk):
            reader.decode(writer.encode(kv), torch.empty_like(kv))


def reheader(encoded: bytes, payload: bytes) -> memoryview:
    """``payload`` behind ``encoded``'s header, fixed up (length and CRC) so only the payload is wrong."""
    fields = list(CodecHeader.FORMAT.unpack_from(encoded, 0))
    fields[-1] = len(payload)
    head = bytearray(CodecHeader.FORMAT.pack(*fields))
    head += struct.pack("<I", __import__("zlib").crc32(head))
    return memoryview(bytes(head) + payload)


@pytest.mark.parametrize("codec", LOSSLESS, ids=codec_id)
def test_compressed_payload_that_does_not_decompress_is_corrupt(codec: ChunkCodec) -> None:
    kv = kv_like_model(torch.bfloat16, 8)
    encoded = bytes(codec.encode(kv))
    payload = encoded[CodecHeader.SIZE :]
    for bad in (payload[: len(payload) // 2], payload[:-7], b"\xff" * 100):
        with pytest.raises(lmplug.CorruptChunk):
            codec.decode(reheader(encoded, bad), torch.empty_like(kv))


@pytest.mark.parametrize("codec", LOSSY, ids=codec_id)
@pytest.mark.parametrize("scale", [0.0, float("inf"), float("nan"), -1.0])
def test_invalid_scales_are_corrupt(codec: ChunkCodec, scale: float) -> None:
    kv = kv_like_model(torch.bfloat16, 2)
    encoded = bytearray(codec.encode(kv))
    encoded[CodecHeader.SIZE + 10 : CodecHeader.SIZE + 12] = (
        torch.tensor([scale], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    )
    with pytest.raises(lmplug.CorruptChunk, match="scales"):
        codec.decode(memoryview(encoded), torch.empty_like(kv))


@pytest.mark.parametrize("codec", LOSSY, ids=codec_id)
def test_lossy_codecs_refuse_non_float_kv_at_configuration(codec: ChunkCodec) -> None:
    with pytest.raises(lmplug.ConfigError, match="quantizes"):
        codec.max_encoded_size(torch.Size([2, 1, 16, 64]), torch.float8_e4m3fn)


# ---------------------------------------------------------------------------- properties

shapes = st.tuples(
    st.just(2),
    st.integers(1, 3),
    st.integers(1, 5),
    st.sampled_from([64, 128, 192, 8, 100]),  # multiples of the group, and rows that are one group
)
finite_floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
special = st.sampled_from([0.0, -0.0, 1.0, 1e-40, -3e38, 65504.0, 1e-7])
any_floats = st.floats(width=32) | special


def kv_arrays(elements: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    # A drawn fill value repeated (zeros, constant groups) with drawn values sprinkled in.
    return shapes.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=elements, fill=finite_floats | special))


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(array=kv_arrays(any_floats), dtype=st.sampled_from(DTYPES), codec=st.sampled_from(LOSSLESS))
def test_lossless_round_trip_property(array: Any, dtype: torch.dtype, codec: ChunkCodec) -> None:
    kv = torch.from_numpy(array).to(dtype)
    _, out = round_trip(codec, kv)
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


@PROPERTY
@given(array=kv_arrays(any_floats), dtype=st.sampled_from(DTYPES), codec=st.sampled_from(LOSSY))
def test_lossy_round_trip_property(array: Any, dtype: torch.dtype, codec: ChunkCodec) -> None:
    kv = torch.from_numpy(array).to(dtype)  # float16 overflows to inf: the non-finite policy applies
    _, out = round_trip(codec, kv)
    finite = torch.isfinite(kv)
    assert torch.equal(torch.isnan(out), ~finite)
    error = (out.double() - kv.double()).abs()[finite]
    assert bool((error <= error_bound(codec, kv)[finite]).all())


@PROPERTY
@given(
    array=kv_arrays(finite_floats),
    codec=st.sampled_from(CODECS),
    cut=st.integers(0, 1 << 20),
    flip=st.integers(0, CodecHeader.SIZE - 1),
)
def test_damaged_input_never_decodes_property(array: Any, codec: ChunkCodec, cut: int, flip: int) -> None:
    kv = torch.from_numpy(array).to(torch.bfloat16)
    encoded = bytes(codec.encode(kv))
    with pytest.raises(lmplug.CorruptChunk):
        codec.decode(memoryview(encoded[: cut % len(encoded)]), torch.empty_like(kv))
    damaged = bytearray(encoded)
    damaged[flip] ^= 0x80
    with pytest.raises(lmplug.CorruptChunk):
        codec.decode(memoryview(damaged), torch.empty_like(kv))


# ---------------------------------------------------------------------------- through the remote tier


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str:
    name = request.node.name.replace("[", "-").replace("]", "")
    STORES.pop(name, None)
    return f"dict://{name}"


def codec_config(url: str, codec: str) -> dict[str, Any]:
    config = two_tier_config(url, codec=codec)
    config["model"].update(dtype="bfloat16", num_kv_heads=2, head_size=64)  # hidden 128: two groups a row
    return config


def prompt(seed: int, tokens: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 30_000 for i in range(tokens)]


@pytest.mark.parametrize("codec", ["lz4", "zstd", "int8", "fp8"])
async def test_second_cache_reads_what_the_first_encoded(url: str, codec: str) -> None:
    config = codec_config(url, codec)
    tokens = prompt(1, 3 * 16 + 5)  # three full chunks and a partial one
    kv = reference_kv(tokens, config)
    async with lmplug.open_cache(config, plugins=dict_host()) as first:
        await first.store(tokens, kv)
        await remote_tier(first).drain()
        assert remote_tier(first).statistics().stored == 4
    store = STORES[url.removeprefix("dict://")]
    assert all(name.startswith(f"lmplug/{codec}/") for name in store)
    async with lmplug.open_cache(config, plugins=dict_host()) as second:
        got, hit = await second.retrieve(tokens)
        assert hit == len(tokens)
        assert remote_tier(second).statistics().hits == 4
    codecs = dict_host().codecs
    if codecs[codec].lossy:
        error = (got.double() - kv.double()).abs()
        assert bool((error <= error_bound(codecs[codec], kv)).all())
    else:
        assert torch.equal(got, kv)


async def test_reader_with_another_codec_misses(url: str) -> None:
    tokens = prompt(2, 2 * 16)
    config = codec_config(url, "zstd")
    async with lmplug.open_cache(config, plugins=dict_host()) as writer:
        await writer.store(tokens, reference_kv(tokens, config))
        await remote_tier(writer).drain()
    for other in ("raw", "lz4", "int8"):
        async with lmplug.open_cache(codec_config(url, other), plugins=dict_host()) as reader:
            assert await reader.lookup(tokens) == 0
            assert (await reader.retrieve(tokens))[1] == 0
