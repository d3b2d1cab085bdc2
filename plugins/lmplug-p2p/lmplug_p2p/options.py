"""The options of a ``type: p2p`` tier."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from lmplug.tierkit import Duration, StrictModel


def host_port(value: str | None) -> str | None:
    """``value`` when it is ``host:port`` (or None); :class:`ValueError` otherwise (an option's check)."""
    if value is None:
        return value
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, not {value!r}")
    return value


def check_reachable(host: str, advertise: str | None, who: str) -> None:
    """A server bound to every interface must say which address ``who`` dial (``advertise``)."""
    if advertise is None and host in ("0.0.0.0", "::"):
        raise ValueError(f"host {host!r} binds every interface: say which address {who} dial in `advertise`")


class P2PTierConfig(StrictModel):
    """Options of a ``type: p2p`` tier: only ``controller`` is required."""

    controller: str = Field(
        min_length=1, description="The controller's HTTP URL, http://HOST:PORT (as `lmplug controller` prints it)."
    )
    host: str = Field(default="127.0.0.1", min_length=1, description="Address the transfer server binds.")
    port: int = Field(default=0, ge=0, le=65535, description="Port of the transfer server; 0 picks a free one.")
    advertise: str | None = Field(
        default=None,
        description="host:port peers dial to fetch from this instance (default: host and the bound port).",
    )
    instance_id: str | None = Field(
        default=None, min_length=1, description="This instance's name at the controller (default: host name and pid)."
    )
    token_env: str | None = Field(
        default=None,
        min_length=1,
        description="Environment variable holding the shared token of the controller and the peers.",
    )
    lookup_timeout: Duration = Field(default=0.2, gt=0, description="Limit of one controller lookup (then a miss).")
    fetch_timeout: Duration = Field(default=5.0, gt=0, description="Limit of one fetch from a peer (then a miss).")
    heartbeat: Duration = Field(default=2.0, gt=0, description="Interval of the heartbeats to the controller.")
    holders: PositiveInt = Field(default=2, description="Peers tried, longest hit first, before a fetch is a miss.")
    transport: str = Field(
        default="tcp", min_length=1, description="How chunks move between peers: tcp, or one a plugin registers."
    )

    @field_validator("controller")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"expected the controller's HTTP URL, http://HOST:PORT, not {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _known_transport(self, info: ValidationInfo) -> P2PTierConfig:
        """With the cache's plugins at hand (``lmplug config check``, start-up), some plugin must
        provide the transport (``tcp``: this one; others through ``lmplug_register_transports``)."""
        plugins = (info.context or {}).get("plugins")
        if plugins is not None:
            plugins.resolve_transport(self.transport)  # PluginUnavailable names the transports there are
        return self

    @field_validator("advertise")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        return host_port(value)

    @model_validator(mode="after")
    def _reachable(self) -> P2PTierConfig:
        check_reachable(self.host, self.advertise, "peers")
        return self

    def name_of_instance(self) -> str:
        return self.instance_id or f"{socket.gethostname()}-{os.getpid()}"

    def token(self) -> str | None:
        """The shared token, read from ``token_env`` (unset or empty: none)."""
        return os.environ.get(self.token_env) or None if self.token_env else None
