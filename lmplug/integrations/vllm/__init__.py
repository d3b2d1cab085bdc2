"""vLLM integration: ``LMPlugConnector``, vLLM's v1 KV connector backed by lmplug.

- :mod:`.connector`: the connector (both roles), imported by vLLM by name;
- :mod:`.scheduler`, :mod:`.worker`: the two roles' work; :mod:`.lookup`: the channel between them;
- :mod:`.paged`: vectorised gather/scatter between vLLM's paged KV and lmplug chunks;
- :mod:`.settings`: the lmplug config of an engine.

The random-weight test model lives in :mod:`lmplug.testing.vllm_model`.

Importing this package does not import vLLM; :func:`register` (vLLM's plugin hook) does.
"""

from __future__ import annotations

import contextlib


def register() -> None:
    """vLLM ``general_plugins`` entry point: make ``kv_connector="LMPlugConnector"`` resolve."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    with contextlib.suppress(ValueError):  # registered already in this process
        KVConnectorFactory.register_connector(
            "LMPlugConnector", "lmplug.integrations.vllm.connector", "LMPlugConnector"
        )
