"""Prefill/decode disaggregation: the parameters a request carries, and what they ask of the connector.

A PD proxy (``lmplug pd-proxy``, in ``lmplug-pd``) sends each request to a prefill instance,
then to a decode instance, with lmplug's parameters in the request body's
``kv_transfer_params`` (vLLM hands them to the connector as ``request.kv_transfer_params``)::

    prefill: {"lmplug": {"pd": {"role": "prefill", "xfer_id": "9f...", "decode": "HOST:PORT", "deadline_ms": 10000}}}
    decode:  {"lmplug": {"pd": {"role": "decode", "xfer_id": "9f...", "prefill": "...", "wait_ms": 10000}}}

- **Prefill.** When the request finishes (one output token), the connector saves the KV of
  ``prompt[:N-1]``, its partial last chunk included, and pushes those chunks to the decode
  instance's receiver at ``decode`` (``Cache.push``, through the stack's ``pd`` tier) within
  ``deadline_ms``.
- **Decode.** The decode instance computes the prompt's last token itself (to sample the
  first output token), so it needs ``prompt[:N-1]``. Its scheduler holds the request back
  (vLLM asks again each step; the request holds no blocks meanwhile) until its cache holds
  that KV, its receiver says the transfer ended (failed, refused, or done with what the
  prefill had: ``Cache.transfer_state``), or ``wait_ms`` have passed since it first asked;
  then it loads what is there and computes the rest. KV that never arrives is a recompute,
  never a hang.

The parameters are lmplug's own (a namespace vLLM's NIXL paths never read). Malformed ones
are ignored with a warning: the request is served as any other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger("lmplug.vllm")

MAX_WAIT_SECONDS = 600.0
"""The longest ``deadline_ms`` / ``wait_ms`` honoured; longer values are cut to it."""


@dataclass(frozen=True, slots=True)
class PDParams:
    """A request's PD role and transfer: where a prefill pushes to, how long a decode waits."""

    role: Literal["prefill", "decode"]
    xfer_id: str
    destination: str | None
    """The decode instance's receiver (``host:port``): where a prefill pushes."""
    seconds: float
    """A prefill's push deadline, a decode's longest wait for the KV."""


def pd_params(request: Any) -> PDParams | None:
    """The PD parameters of a vLLM request, or None (none given, or malformed: logged)."""
    params = getattr(request, "kv_transfer_params", None)
    lmplug = params.get("lmplug") if isinstance(params, dict) else None
    pd = lmplug.get("pd") if isinstance(lmplug, dict) else None
    if pd is None:
        return None
    try:
        return _parse(pd)
    except ValueError as exc:
        logger.warning("lmplug: request %s: ignoring kv_transfer_params.lmplug.pd: %s", request.request_id, exc)
        return None


def _parse(pd: object) -> PDParams:
    if not isinstance(pd, dict):
        raise ValueError("it must be an object")
    role = pd.get("role")
    xfer_id = pd.get("xfer_id")
    if role not in ("prefill", "decode"):
        raise ValueError(f"role must be 'prefill' or 'decode', not {role!r}")
    if not isinstance(xfer_id, str) or not 0 < len(xfer_id) <= 128:
        raise ValueError(f"xfer_id must be a non-empty string of at most 128 characters, not {xfer_id!r}")
    name = "deadline_ms" if role == "prefill" else "wait_ms"
    milliseconds = pd.get(name, 10_000)
    if isinstance(milliseconds, bool) or not isinstance(milliseconds, int | float) or not milliseconds >= 0:
        raise ValueError(f"{name} must be a number of milliseconds >= 0, not {milliseconds!r}")
    seconds = min(float(milliseconds) / 1000, MAX_WAIT_SECONDS) if math.isfinite(milliseconds) else MAX_WAIT_SECONDS
    destination = None
    if role == "prefill":
        destination = pd.get("decode")
        if not isinstance(destination, str) or not destination:
            raise ValueError(f"a prefill needs 'decode', the decode instance's receiver HOST:PORT, not {destination!r}")
    return PDParams(role, xfer_id, destination, seconds)


def finished_params(xfer_id: str, **fields: object) -> dict[str, Any]:
    """What ``request_finished`` returns: vLLM puts it in the response's ``kv_transfer_params``."""
    return {"lmplug": {"pd": {"xfer_id": xfer_id, **fields}}}
