"""The bodies the proxy sends each leg: the client's OpenAI request, with lmplug's PD parameters in
``kv_transfer_params.lmplug.pd`` (the namespace keeps them clear of vLLM's NIXL-specific keys).

::

    prefill: {"role": "prefill", "xfer_id": ..., "decode": <the decode's receiver HOST:PORT>, "deadline_ms": ...}
    decode:  {"role": "decode", "xfer_id": ..., "prefill": <prefill URL>, "wait_ms": ...}

lmplug's vLLM connector reads them (``lmplug.integrations.vllm.pd``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PREFILL_ONLY_REMOVED", "ParamsError", "decode_body", "pd_params", "prefill_body"]

PREFILL_ONLY_REMOVED = ("stream_options", "min_tokens")
"""Fields the prefill leg drops: it answers one token, not streamed."""


class ParamsError(ValueError):
    """The client's body cannot carry the PD parameters (its ``kv_transfer_params`` is not an object)."""


def prefill_body(body: dict[str, Any], *, xfer_id: str, decode: str, deadline_ms: int) -> dict[str, Any]:
    """``body`` for the prefill instance: one output token, not streamed, the prefill parameters added.

    The prefill's token is discarded: the decode instance computes the prompt's last token and
    samples the first output token itself, so its answer is what one instance alone would give.
    """
    changed = {name: value for name, value in body.items() if name not in PREFILL_ONLY_REMOVED}
    changed["max_tokens"] = 1
    if "max_completion_tokens" in changed:
        changed["max_completion_tokens"] = 1
    changed["stream"] = False
    pd = {"role": "prefill", "xfer_id": xfer_id, "decode": decode, "deadline_ms": deadline_ms}
    return _with_pd(changed, pd)


def decode_body(body: dict[str, Any], *, xfer_id: str, prefill: str, wait_ms: int) -> dict[str, Any]:
    """``body`` for the decode instance: unchanged but for the decode parameters."""
    pd = {"role": "decode", "xfer_id": xfer_id, "prefill": prefill, "wait_ms": wait_ms}
    return _with_pd(dict(body), pd)


def pd_params(body: dict[str, Any]) -> dict[str, Any] | None:
    """The PD parameters in ``body``, or ``None`` (what the upstream doubles of the tests read)."""
    params = body.get("kv_transfer_params")
    lmplug = params.get("lmplug") if isinstance(params, dict) else None
    pd = lmplug.get("pd") if isinstance(lmplug, dict) else None
    return pd if isinstance(pd, dict) else None


def _with_pd(body: dict[str, Any], pd: dict[str, Any]) -> dict[str, Any]:
    """``body`` with ``pd`` at ``kv_transfer_params.lmplug.pd``; other keys the client put in
    ``kv_transfer_params`` are kept, a ``pd`` it put there is replaced."""
    params = body.get("kv_transfer_params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ParamsError("'kv_transfer_params' must be an object")
    lmplug = params.get("lmplug")
    if lmplug is None:
        lmplug = {}
    if not isinstance(lmplug, dict):
        raise ParamsError("'kv_transfer_params.lmplug' must be an object")
    body["kv_transfer_params"] = {**params, "lmplug": {**lmplug, "pd": pd}}
    return body
