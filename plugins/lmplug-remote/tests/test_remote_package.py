"""The plugin's face: registering imports no connector library, and a missing one is named with its extra."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(script: str) -> str:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()


def test_loading_the_plugins_imports_no_connector_or_codec_library() -> None:
    loaded = run(
        "import os, sys, lmplug\n"
        "os.environ['LMPLUG_PLUGINS'] = 'cpu,disk,remote'  # this package's laziness (p2p uses lmplug_server)\n"
        "host = lmplug.PluginHost.from_environment()\n"
        "assert 'remote' in host.plugins, host.plugins\n"
        "libraries = ('redis', 'hiredis', 'aiobotocore', 'botocore', 'aiohttp', 'zstandard', 'lz4', 'lmplug_server')\n"
        "print(sorted(name for name in libraries if name in sys.modules))"
    )
    assert loaded == "[]"


@pytest.mark.parametrize(
    ("library", "url", "options", "extra"),
    [
        ("redis", "redis://127.0.0.1", "lmplug_remote.redis.RedisOptions()", "redis"),
        ("aiobotocore", "s3://bucket", "lmplug_remote.s3.S3Options()", "s3"),
        ("lmplug_server", "lm://127.0.0.1", "lmplug_remote.lm.LmOptions()", "lm"),
    ],
)
def test_a_scheme_whose_library_is_missing_names_the_extra(library: str, url: str, options: str, extra: str) -> None:
    scheme = extra
    message = run(
        f"import sys\nsys.modules[{library!r}] = None  # as if it were not installed\n"
        "import lmplug, lmplug_remote.redis, lmplug_remote.s3, lmplug_remote.lm\n"
        f"try:\n    lmplug_remote.{scheme}.SCHEME.factory({url!r}, {options})\n"
        "except lmplug.PluginUnavailable as exc:\n    print(exc)\n"
    )
    assert f"pip install 'lmplug-remote[{extra}]'" in message
    assert repr(library) in message


@pytest.mark.parametrize(("library", "codec"), [("lz4", "Lz4Codec"), ("zstandard", "ZstdCodec")])
def test_a_codec_whose_library_is_missing_names_the_extra(library: str, codec: str) -> None:
    message = run(
        f"import sys\nsys.modules[{library!r}] = None  # as if it were not installed\n"
        "import lmplug, lmplug_remote.codecs\n"
        f"codec = lmplug_remote.codecs.{codec}()  # registering the codec needs nothing\n"
        "try:\n    codec.prepare()\n"
        "except lmplug.PluginUnavailable as exc:\n    print(exc)\n"
    )
    assert "pip install 'lmplug-remote[codecs]'" in message
