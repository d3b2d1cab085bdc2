"""The options of a ``type: pd`` tier."""

from __future__ import annotations

import os

from pydantic import Field, field_validator, model_validator

from lmplug.tierkit import ByteSize, Duration, StrictModel
from lmplug_p2p.options import check_reachable, host_port


class PDTierConfig(StrictModel):
    """Options of a ``type: pd`` tier; none is required."""

    host: str = Field(default="127.0.0.1", min_length=1, description="Address the receiver binds.")
    port: int = Field(default=0, ge=0, le=65535, description="Port of the receiver; 0 picks a free one.")
    advertise: str | None = Field(
        default=None, description="host:port prefill instances dial to push here (default: host and the bound port)."
    )
    max_inflight: ByteSize = Field(
        default=256 << 20, gt=0, description="Bytes of transfers being received at once (reserved at OPEN)."
    )
    admit_timeout: Duration = Field(
        default=5.0, ge=0, description="How long an OPEN waits for room in max_inflight before it is refused (busy)."
    )
    hold: Duration = Field(
        default=120.0, ge=0, description="How long a transfer's verified chunks are held (not evicted) after it ends."
    )
    connect_timeout: Duration = Field(default=2.0, gt=0, description="Limit of a push's connection and HELLO.")
    idle_timeout: Duration = Field(
        default=5.0, gt=0, description="Longest silence mid-transfer (a frame, or one chunk's bytes); then it ends."
    )
    token_env: str | None = Field(
        default=None, min_length=1, description="Environment variable holding the token senders and receivers share."
    )
    debug_chunk_delay: Duration = Field(
        default=0.0, ge=0, description="For failure tests only: the sender sleeps this long before each chunk."
    )

    @field_validator("advertise")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        return host_port(value)

    @model_validator(mode="after")
    def _reachable(self) -> PDTierConfig:
        check_reachable(self.host, self.advertise, "senders")
        return self

    def token(self) -> str | None:
        """The shared token, read from ``token_env`` (unset or empty: none)."""
        return os.environ.get(self.token_env) or None if self.token_env else None
