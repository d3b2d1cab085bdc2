"""vLLM integration: moving KV between vLLM's paged KV cache and lmplug chunks.

The KV connector itself comes with the vLLM issue; :mod:`.paged` already holds the
vectorised gather/scatter through vLLM's slot mapping for its CPU and CUDA layouts. This
package does not import vLLM.
"""

import contextlib


def register() -> None:
    """vLLM ``general_plugins`` entry point: make ``kv_connector="LMPlugConnector"`` resolve."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    with contextlib.suppress(ValueError):  # registered already in this process
        KVConnectorFactory.register_connector(
            "LMPlugConnector", "lmplug.integrations.vllm.connector", "LMPlugConnector"
        )
