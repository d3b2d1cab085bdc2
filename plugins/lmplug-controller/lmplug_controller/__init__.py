"""lmplug-controller: a registry of lmplug instances and an index of which of them holds which
KV chunks, so that one instance can fetch a prefix another has computed.

Workers (one per instance and TP rank) talk to it over ZeroMQ (:mod:`lmplug_controller.client`);
people and scripts over HTTP (:mod:`lmplug_controller.http`). It imports neither lmplug nor torch.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PORT", "PROTOCOL_VERSION", "TOKEN_ENV"]

DEFAULT_PORT = 9000
"""The HTTP port the controller listens on unless told otherwise."""

PROTOCOL_VERSION = 1
"""The version of the worker protocol (PROTOCOL.md); REGISTER names it, a mismatch is refused."""

TOKEN_ENV = "LMPLUG_CONTROLLER_TOKEN"
"""The environment variable the token is read from by default (``--token-env`` names another)."""
