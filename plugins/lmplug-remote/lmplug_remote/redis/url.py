"""What a redis URL names: servers, credentials, database, TLS, cluster."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from lmplug import ConfigError
from lmplug_remote.redis.options import RedisOptions, RedisTLSOptions

__all__ = ["DEFAULT_PORT", "Target", "netloc"]

DEFAULT_PORT = 6379


class Target:
    """What a URL names: servers, credentials, database, TLS, cluster."""

    def __init__(self, url: str, options: RedisOptions) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme.lower()
        self.cluster = self.scheme == "redis+cluster"
        self.tls = self.scheme == "rediss"
        if parts.query or parts.fragment:
            raise ConfigError(f"{url!r}: query and fragment are not used; put options in the connector section")
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        url_user, _, url_password = userinfo.partition(":")
        self.hosts = [_host_port(url, item) for item in hostlist.split(",")] if hostlist else []
        if not self.hosts:
            raise ConfigError(f"{url!r}: no host (e.g. {self.scheme}://127.0.0.1:6379)")
        if len(self.hosts) > 1 and not self.cluster:
            raise ConfigError(f"{url!r}: several hosts need redis+cluster://")
        self.username = options.username or unquote(url_user) or None
        secret = options.password.get_secret_value() if options.password is not None else None
        self.password = secret or unquote(url_password) or None
        path = parts.path.strip("/")
        url_db: int | None = None
        if path:
            if not path.isdigit():
                raise ConfigError(f"{url!r}: the path must be a database number, not {path!r}")
            url_db = int(path)
        if url_db is not None and options.db is not None and url_db != options.db:
            raise ConfigError(f"{url!r}: database {url_db} in the URL, but db: {options.db} in the options")
        self.db = options.db if options.db is not None else (url_db or 0)
        if self.cluster and self.db:
            raise ConfigError(f"{url!r}: Redis Cluster has only database 0")
        if not self.tls and options.tls != RedisTLSOptions():
            raise ConfigError(f"{url!r}: tls options need a rediss:// URL")
        self.where = ",".join(netloc(host, port) for host, port in self.hosts)


def netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_port(url: str, item: str) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ConfigError(f"{url!r}: empty host in {item!r}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{url!r}: bad port in {item!r}")
    return host, int(port_text)
