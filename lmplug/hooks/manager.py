"""Loading plugins: the ``lmplug`` entry-point group, operator switches, and tier types.

Loading is explicit and happens once per :class:`PluginHost`, which the running cache
(or the CLI) owns; nothing is loaded or registered at import time.

Environment switches:

- ``LMPLUG_PLUGINS``: comma-separated allow-list of entry-point names; when set, only
  those load (set but empty: none).
- ``LMPLUG_DISABLE_PLUGIN_AUTOLOAD``: any true value (1, true, yes) loads no entry points.
- ``LMPLUG_TRACE_PLUGINS``: any true value logs every composition-hook call at DEBUG
  level on the ``lmplug.plugins`` logger.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy
from pydantic import ValidationError

from lmplug.core.config import config_error
from lmplug.core.extension import EngineExtension, EngineExtensionType
from lmplug.core.remote import ChunkCodec, PeerTransport, RawCodec, RemoteScheme
from lmplug.core.tier import TierType
from lmplug.errors import PluginContractError, PluginUnavailable
from lmplug.hooks import specs
from lmplug.hooks.specs import make_plugin_manager

logger = logging.getLogger("lmplug.plugins")

ENTRY_POINT_GROUP = "lmplug"
_REGISTRIES = {
    "tier type": "tier_types",
    "remote scheme": "remote_schemes",
    "codec": "codecs",
    "transport": "transports",
    "engine extension": "engine_extensions",
}
_TRUE = {"1", "true", "yes", "on"}


def _check_composition_hooks(pm: pluggy.PluginManager, plugin: object) -> None:
    """A plugin module implements only the synchronous composition hooks."""
    for caller in pm.get_hookcallers(plugin) or ():
        if caller.name in specs.DATA_PATH_HOOKS or caller.name in specs.OPTIONAL_DATA_PATH_HOOKS:
            raise PluginContractError(
                f"{caller.name} is a data-path hook: implement it as an async method of the tier object "
                "your tier factory builds, not on the plugin module"
            )
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and inspect.iscoroutinefunction(impl.function):
                raise PluginContractError(f"{caller.name} is a synchronous composition hook; it must not be async")


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """A plugin the host knows of: loaded, or failed with ``error``."""

    name: str
    distribution: str | None
    version: str | None
    module: str
    hooks: tuple[str, ...] = ()
    tier_types: tuple[str, ...] = ()
    remote_schemes: tuple[str, ...] = ()
    codecs: tuple[str, ...] = ()
    transports: tuple[str, ...] = ()
    engine_extensions: tuple[str, ...] = ()
    error: str | None = None


@dataclass(slots=True)
class PluginHost:
    """A plugin manager plus what was loaded into it: the plugins and their tier types."""

    pm: pluggy.PluginManager = field(default_factory=make_plugin_manager)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    tier_types: dict[str, TierType[Any]] = field(default_factory=dict)
    remote_schemes: dict[str, RemoteScheme[Any]] = field(default_factory=dict)
    codecs: dict[str, ChunkCodec] = field(default_factory=lambda: {"raw": RawCodec()})
    transports: dict[str, PeerTransport] = field(default_factory=dict)
    engine_extensions: dict[str, EngineExtensionType[Any]] = field(default_factory=dict)
    _owners: dict[tuple[str, str], str] = field(default_factory=lambda: {("codec", "raw"): "lmplug"})

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> PluginHost:
        """A host with the entry-point plugins loaded as the environment switches allow."""
        env = os.environ if environ is None else environ
        host = cls()
        if env.get("LMPLUG_TRACE_PLUGINS", "").strip().lower() in _TRUE:
            host.pm.trace.root.setwriter(lambda message: logger.debug("%s", message.rstrip()))
            host.pm.enable_tracing()
        if env.get("LMPLUG_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() in _TRUE:
            return host
        allowed: set[str] | None = None
        if "LMPLUG_PLUGINS" in env:
            allowed = {name.strip() for name in env["LMPLUG_PLUGINS"].split(",") if name.strip()}
        host.load_entry_points(allowed)
        return host

    def load_entry_points(self, allowed: set[str] | None = None) -> None:
        """Load every plugin of the ``lmplug`` entry-point group (or only ``allowed`` names)."""
        for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
            if allowed is not None and entry_point.name not in allowed:
                continue
            if entry_point.name in self.plugins:
                continue
            dist = entry_point.dist
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            try:
                plugin = entry_point.load()
            except Exception as exc:  # a broken plugin is recorded; a configured tier needing it fails
                self._failed(entry_point.name, dist_name, version, entry_point.value, exc)
                continue
            self.register(plugin, entry_point.name, distribution=dist_name, version=version)

    def register(
        self, plugin: ModuleType | object, name: str, *, distribution: str | None = None, version: str | None = None
    ) -> None:
        """Register one plugin object and collect the tier types, remote schemes and codecs it offers."""
        module = getattr(plugin, "__name__", type(plugin).__name__)
        try:
            self.pm.register(plugin, name=name)
            _check_composition_hooks(self.pm, plugin)
        except (ValueError, pluggy.PluginValidationError) as exc:
            self._failed(name, distribution, version, module, exc)
            return
        except PluginContractError as exc:
            self.pm.unregister(name=name)
            self._failed(name, distribution, version, module, exc)
            return
        others = [other for other in self.pm.get_plugins() if other is not plugin]
        try:
            offered = self._offers(others)
        except Exception as exc:
            self.pm.unregister(name=name)
            self._failed(name, distribution, version, module, exc)
            return
        for kind, names in offered.items():
            for item in names:
                owner = self._owners.get((kind, item))
                if owner is not None:
                    self.pm.unregister(name=name)
                    raise PluginContractError(
                        f"plugins {owner!r} and {name!r} both register {kind} {item!r}; "
                        "uninstall one or exclude it with LMPLUG_PLUGINS"
                    )
        for kind, names in offered.items():
            for item, value in names.items():
                self._owners[(kind, item)] = name
                getattr(self, _REGISTRIES[kind])[item] = value
        hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()))
        self.plugins[name] = PluginInfo(
            name,
            distribution,
            version,
            module,
            hooks,
            tuple(offered["tier type"]),
            tuple(offered["remote scheme"]),
            tuple(offered["codec"]),
            tuple(offered["transport"]),
            tuple(offered["engine extension"]),
            error=None,
        )

    def _offers(self, others: list[object]) -> dict[str, dict[str, Any]]:
        """What one newly registered plugin offers, by kind; raises for a registration of the wrong type."""
        tier_types: list[object] = []
        schemes: list[object] = []
        codecs: list[object] = []
        transports: list[object] = []
        extensions: list[object] = []
        # Calls through the plugin manager (so LMPLUG_TRACE_PLUGINS shows them) on this plugin alone.
        self.pm.subset_hook_caller("lmplug_register_tier_types", others)(register=tier_types.append)
        self.pm.subset_hook_caller("lmplug_register_remote_schemes", others)(register=schemes.append)
        self.pm.subset_hook_caller("lmplug_register_codecs", others)(register=codecs.append)
        self.pm.subset_hook_caller("lmplug_register_transports", others)(register=transports.append)
        self.pm.subset_hook_caller("lmplug_register_engine_extensions", others)(register=extensions.append)
        offered: dict[str, dict[str, Any]] = {kind: {} for kind in _REGISTRIES}
        for item in tier_types:
            if not isinstance(item, TierType):
                raise TypeError(f"registered {item!r}, not a TierType")
            offered["tier type"][item.name] = item
        for item in schemes:
            if not isinstance(item, RemoteScheme):
                raise TypeError(f"registered {item!r}, not a RemoteScheme")
            offered["remote scheme"].update(dict.fromkeys(item.schemes, item))
        for item in codecs:
            if not isinstance(item, ChunkCodec):
                raise TypeError(f"registered {item!r}, not a ChunkCodec")
            offered["codec"][item.name] = item
        for item in transports:
            if not isinstance(item, PeerTransport):
                raise TypeError(f"registered {item!r}, not a PeerTransport")
            offered["transport"][item.name] = item
        for item in extensions:
            if not isinstance(item, EngineExtensionType):
                raise TypeError(f"registered {item!r}, not an EngineExtensionType")
            offered["engine extension"][item.name] = item
        return offered

    def build_engine_extensions(self, sections: Mapping[str, Mapping[str, Any]]) -> list[EngineExtension]:
        """The engine extensions a config's ``extensions:`` lists, built from their validated options.

        An extension no installed plugin offers is :class:`PluginUnavailable`; bad options are a
        :class:`~lmplug.errors.ConfigError` naming the key (``extensions.blend.ratios``).
        """
        built: list[EngineExtension] = []
        for name, options in sections.items():
            kind = self.engine_extensions.get(name)
            if kind is None:
                known = ", ".join(sorted(self.engine_extensions)) or "none"
                raise PluginUnavailable(
                    f"no installed plugin provides engine extension {name!r} (extensions available: {known}); "
                    f"install it with `pip install lmplug-{name}`"
                )
            try:
                settings = kind.config_model.model_validate(dict(options or {}))
            except ValidationError as exc:
                raise config_error(exc, prefix=f"extensions.{name}") from None
            extension = kind.factory(settings)
            extension.name = name
            built.append(extension)
        return built

    def resolve_remote_scheme(self, scheme: str) -> RemoteScheme[Any]:
        """The connector registered for URL ``scheme``, or :class:`PluginUnavailable` naming the known ones."""
        found = self.remote_schemes.get(scheme)
        if found is None:
            known = ", ".join(sorted(self.remote_schemes)) or "none"
            raise PluginUnavailable(
                f"no installed plugin serves remote URL scheme {scheme!r} (schemes available: {known}); "
                "install the plugin that provides it (the built-in ones come with `pip install lmplug-remote`)"
            )
        return found

    def resolve_codec(self, name: str) -> ChunkCodec:
        """The codec registered as ``name``, or :class:`PluginUnavailable` naming the known ones."""
        found = self.codecs.get(name)
        if found is None:
            known = ", ".join(sorted(self.codecs))
            raise PluginUnavailable(
                f"no installed plugin provides codec {name!r} (codecs available: {known}); "
                "the compression and quantization codecs come with `pip install lmplug-remote`"
            )
        return found

    def resolve_transport(self, name: str) -> PeerTransport:
        """The peer transport registered as ``name``, or :class:`PluginUnavailable` naming the known ones."""
        found = self.transports.get(name)
        if found is None:
            known = ", ".join(sorted(self.transports)) or "none"
            raise PluginUnavailable(
                f"no installed plugin provides peer transport {name!r} (transports available: {known}); "
                "`tcp` comes with `pip install lmplug-p2p`"
            )
        return found

    def _failed(
        self, name: str, distribution: str | None, version: str | None, module: str, exc: BaseException
    ) -> None:
        error = f"{type(exc).__name__}: {exc}"
        logger.warning("lmplug plugin %r (%s) failed to load: %s", name, distribution or module, error)
        self.plugins[name] = PluginInfo(name, distribution, version, module, error=error)

    def resolve_tier_type(self, type_name: str) -> TierType[Any]:
        """The registered tier type ``type_name``, or :class:`PluginUnavailable` saying what to install."""
        tier_type = self.tier_types.get(type_name)
        if tier_type is not None:
            return tier_type
        hint = f"pip install lmplug-{type_name}"
        broken = self.plugins.get(type_name)
        if broken is not None and broken.error is not None:
            dist = f"{broken.distribution} {broken.version}" if broken.distribution else broken.module
            raise PluginUnavailable(
                f"tier type {type_name!r} comes from plugin {type_name!r} ({dist}), which failed to load: "
                f"{broken.error}. Reinstall it ({hint}) or fix the error above."
            )
        known = ", ".join(sorted(self.tier_types)) or "none"
        raise PluginUnavailable(
            f"no installed plugin provides tier type {type_name!r} (tier types available: {known}). "
            f"Install it with `{hint}`, or check LMPLUG_PLUGINS / LMPLUG_DISABLE_PLUGIN_AUTOLOAD."
        )
