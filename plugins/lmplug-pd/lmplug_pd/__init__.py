"""lmplug-pd: prefill/decode disaggregation for vLLM with lmplug.

So far the proxy (:mod:`lmplug_pd.proxy`, the ``lmplug pd-proxy`` and ``lmplug-pd-proxy``
commands): it sends each OpenAI request to a prefill instance, then to a decode instance with
the transfer parameters (:mod:`lmplug_pd.params`), and relays the decode's answer. The proxy's
modules import neither lmplug nor torch; :mod:`lmplug_pd.command` registers the sub-command.
"""

from __future__ import annotations

__all__: list[str] = []
