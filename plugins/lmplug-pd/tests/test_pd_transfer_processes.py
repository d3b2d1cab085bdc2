"""A prefill instance in another process, SIGKILLed in the middle of a push: the decode cache in
this process keeps the verified prefix, and its in-flight budget comes back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pd_transfer_testing import CHUNK, eventually, pd_tier, prompt, received, serves, stack

import lmplug

HERE = Path(__file__).parent


async def test_a_sender_killed_mid_transfer_leaves_the_verified_prefix(tmp_path: Path) -> None:
    length = 8 * CHUNK + 3
    config = stack()
    decode = lmplug.open_cache(config)
    async with decode:
        path = tmp_path / "prefill.json"
        path.write_text(json.dumps(stack(debug_chunk_delay=0.3)))
        command = [sys.executable, str(HERE / "pd_sender_peer.py"), str(path), "21", str(length)]
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, then only polled and killed
            [*command, pd_tier(decode).endpoint], stdout=subprocess.PIPE, text=True, cwd=HERE
        )
        try:
            await eventually(lambda: received(decode)["chunks_admitted"] >= 2, limit=30)
            process.kill()
            process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            assert process.stdout is not None
            output = process.stdout.read()
            process.stdout.close()
        assert output.split() == ["pushing"]  # killed before the push ended
        await eventually(lambda: received(decode)["inflight_bytes"] == 0)
        admitted = received(decode)["chunks_admitted"]
        assert 2 <= admitted < 9
        assert received(decode)["failed"] == {"connection": 1}
        tokens = prompt(21, length)
        assert await decode.lookup(tokens) == admitted * CHUNK
        assert await serves(decode, config, tokens) == admitted * CHUNK
    assert received(decode)["held_chunks"] == 0
    assert decode.allocator.statistics().allocations == 0
