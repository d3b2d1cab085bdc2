"""Typed configuration: one YAML file (or dict) plus ``LMPLUG_*`` environment overrides.

The core validates its own keys here; each tier's options are validated by the config
model its plugin registers (see :mod:`lmplug.core.composer`). Unknown keys are errors
that name the key's path, e.g. ``tiers[0].capacty: unknown key``.

An ``LMPLUG_*`` variable overrides a key only when its first segment names a top-level key:
other programs use the prefix too (a user's ``LMPLUG_VENV``, lmplug-server's
``LMPLUG_SERVER_BACKEND``), and a variable lmplug does not own must not stop an engine from
starting. Such variables are left alone with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from lmplug.core.units import Duration
from lmplug.errors import ConfigError

logger = logging.getLogger("lmplug.config")

CONFIG_ENV = "LMPLUG_CONFIG"
ENV_PREFIX = "LMPLUG_"
# Variables with the prefix that steer the core itself rather than override config keys.
# Variables of plugins and integrations are not listed: they are simply not config keys.
CONTROL_ENV = frozenset(
    {CONFIG_ENV, "LMPLUG_PLUGINS", "LMPLUG_DISABLE_PLUGIN_AUTOLOAD", "LMPLUG_TRACE_PLUGINS", "LMPLUG_LOG_LEVEL"}
)
_noted: set[str] = set()  # variables already reported as not config keys (once per process)

KVDtypeName = Literal["float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2", "int8", "uint8"]
HashAlgorithm = Literal["blake3", "xxh3_128"]


class StrictModel(BaseModel):
    """Base of every config model: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StrictModel):
    """The model whose KV is cached, and its KV geometry."""

    name: str = Field(min_length=1, description="Model id; KV of different models never matches.")
    num_layers: PositiveInt
    num_kv_heads: PositiveInt
    head_size: PositiveInt
    dtype: KVDtypeName = "bfloat16"


class TierConfig(BaseModel):
    """One entry of ``tiers:``: a plugin's ``type``, a unique ``name``, and that plugin's options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1, description="Tier type registered by a plugin, e.g. 'cpu'.")
    name: str = Field(default="", description="Unique name in the stack; defaults to the type.")

    @property
    def tier_name(self) -> str:
        return self.name or self.type

    @property
    def options(self) -> dict[str, Any]:
        """The plugin's own options (everything but ``type`` and ``name``)."""
        return dict(self.model_extra or {})


class LmplugConfig(StrictModel):
    """The whole configuration of one cache."""

    chunk_size: PositiveInt = Field(default=256, description="Tokens per chunk.")
    save_partial_chunks: bool = Field(
        default=False, description="Also store a trailing partial chunk (found again by prompts that extend it)."
    )
    hash_algorithm: HashAlgorithm = "blake3"
    namespace: str | None = Field(
        default=None, description="Tenant salt: caches with different namespaces never share KV."
    )
    model: ModelConfig
    world_size: PositiveInt = 1
    rank: int = Field(default=0, ge=0)
    lease_timeout: Duration = Field(default=300.0, gt=0, description="Seconds before an unreleased lease expires.")
    tiers: list[TierConfig] = Field(min_length=1)
    extensions: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Engine extensions by name (e.g. blend), each with its plugin's options; off unless listed.",
    )

    @model_validator(mode="after")
    def _check(self) -> LmplugConfig:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is out of range for world_size {self.world_size}")
        seen: dict[str, int] = {}
        for index, tier in enumerate(self.tiers):
            if tier.tier_name in seen:
                raise ValueError(
                    f"tiers[{index}] and tiers[{seen[tier.tier_name]}] are both named {tier.tier_name!r}; "
                    "give each tier a unique 'name'"
                )
            seen[tier.tier_name] = index
        return self


def format_location(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """Render a pydantic error location as a key path: ``tiers[0].capacity``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<root>"


def config_error(error: ValidationError, *, prefix: str = "", source: str = "") -> ConfigError:
    """Translate a pydantic ``ValidationError`` into a :class:`ConfigError` listing key paths."""
    lines = []
    for item in error.errors(include_url=False):
        path = format_location(tuple(item["loc"]), prefix)
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "value_error" and "error" in item.get("ctx", {}):
            message = str(item["ctx"]["error"])  # a validator's own words, without pydantic's prefix
        else:
            message = item["msg"]
        lines.append(f"  {path}: {message}")
    where = f" in {source}" if source else ""
    return ConfigError(f"invalid lmplug configuration{where}:\n" + "\n".join(lines))


def _env_value(raw: str) -> object:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with ``LMPLUG_A__B__0__C=value`` set at ``a.b[0].c`` (values parsed as YAML).

    Only variables whose ``A`` is a field of :class:`LmplugConfig` are overrides. Any other
    ``LMPLUG_*`` variable (a plugin's, lmplug-server's, a user's own) is left alone, and
    logged once per process at WARNING in case it was meant as an override
    (:data:`CONTROL_ENV` silently).
    """
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in CONTROL_ENV:
            continue
        parts = [part.lower() for part in variable[len(ENV_PREFIX) :].split("__")]
        if parts[0] not in LmplugConfig.model_fields:
            if variable not in _noted:
                _noted.add(variable)
                logger.warning(
                    "environment variable %s overrides no lmplug config key (%r is not one); the config ignores it",
                    variable,
                    parts[0],
                )
            continue
        if not all(parts):
            raise ConfigError(f"environment variable {variable} does not name a config key")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{variable}: no list entry {part!r} at {'.'.join(parts[:depth]) or '<root>'}")
                if last:
                    node[int(part)] = _env_value(environ[variable])
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _env_value(environ[variable])
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"{variable}: {'.'.join(parts[:depth])} is not a section")
    return data


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML config file (unvalidated); :class:`ConfigError` if it cannot be read."""
    return _read_yaml(Path(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read lmplug config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


ConfigSource = LmplugConfig | Mapping[str, Any] | str | os.PathLike[str] | None


def load_config(source: ConfigSource = None, *, environ: Mapping[str, str] | None = None) -> LmplugConfig:
    """Build a validated :class:`LmplugConfig`.

    ``source`` is a YAML path, a mapping, an existing config (returned as is), or ``None``
    to read the path in ``LMPLUG_CONFIG``. ``LMPLUG_*`` environment overrides apply to
    paths and mappings (see :func:`apply_env_overrides`).
    """
    if isinstance(source, LmplugConfig):
        return source
    env = os.environ if environ is None else environ
    origin = ""
    if source is None:
        path = env.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no lmplug configuration given and {CONFIG_ENV} is not set")
        source = path
    if isinstance(source, (str, os.PathLike)):
        origin = os.fspath(source)
        data = _read_yaml(Path(source))
    elif isinstance(source, Mapping):
        data = _deep_copy(source)
    else:
        raise ConfigError(f"a config must be a path, a mapping or an LmplugConfig, not {type(source).__name__}")
    data = apply_env_overrides(data, env)
    try:
        return LmplugConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, source=origin) from None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _deep_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_copy(item) for item in value]
    return value
