"""Options of the redis connectors (pydantic only: read when the plugin registers its schemes)."""

from __future__ import annotations

from pydantic import Field, NonNegativeInt, PositiveInt, SecretStr

from lmplug.tierkit import Duration, StrictModel

__all__ = ["RedisOptions", "RedisTLSOptions"]


class RedisTLSOptions(StrictModel):
    """TLS of a ``rediss://`` URL."""

    ca_file: str | None = Field(default=None, description="CA bundle that signs the server's certificate.")
    cert_file: str | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: str | None = Field(default=None, description="Private key of the client certificate.")
    verify: bool = Field(default=True, description="Verify the server's certificate and host name.")


class RedisOptions(StrictModel):
    """Options of the redis connectors (the tier's ``connector:`` section)."""

    username: str | None = Field(default=None, description="ACL user; default: the URL's user, else none.")
    password: SecretStr | None = Field(default=None, description="Password; default: the URL's password, else none.")
    db: NonNegativeInt | None = Field(default=None, description="Database number; default: the URL's path, else 0.")
    tls: RedisTLSOptions = Field(default_factory=RedisTLSOptions, description="TLS settings (rediss:// only).")
    max_connections: PositiveInt = Field(default=16, description="Connections (and calls in flight) per server.")
    socket_timeout: Duration = Field(default=5.0, gt=0, description="Limit of one socket read or write.")
    connect_timeout: Duration = Field(default=2.0, gt=0, description="Limit of opening one connection.")
    retries: NonNegativeInt = Field(default=1, description="Immediate retries of a call after a connection error.")
