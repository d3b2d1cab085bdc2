"""lmplug-pd: prefill/decode disaggregation for vLLM with lmplug.

Two parts: the ``pd`` tier (:mod:`lmplug_pd.tier`, registered by :mod:`lmplug_pd.plugin`), which
pushes a prompt's KV from a prefill instance to a decode instance's receiver
(:mod:`lmplug_pd.transfer`, frames in :mod:`lmplug_pd.protocol`); and the proxy
(:mod:`lmplug_pd.proxy`, the ``lmplug pd-proxy`` and ``lmplug-pd-proxy`` commands), which sends
each OpenAI request to a prefill instance, then to a decode instance with the transfer
parameters (:mod:`lmplug_pd.params`). This module imports nothing, so the proxy's modules load
neither lmplug nor torch; :mod:`lmplug_pd.command` registers the sub-command.
"""

from __future__ import annotations

__all__: list[str] = []
