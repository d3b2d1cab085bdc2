"""Composing the configured tier stack from the tier types that plugins registered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from lmplug.core.config import LmplugConfig, TierConfig, config_error
from lmplug.core.keys import ChunkKey
from lmplug.core.layout import KVLayout
from lmplug.core.tier import Tier, TierContext, TierType
from lmplug.errors import LmplugError, PluginContractError, PluginError
from lmplug.hooks.manager import PluginHost


@dataclass(frozen=True, slots=True)
class PlannedTier:
    """A configured tier whose type resolved and whose options validated."""

    index: int
    entry: TierConfig
    tier_type: TierType[Any]
    options: BaseModel


def plan_tiers(config: LmplugConfig, host: PluginHost) -> list[PlannedTier]:
    """Resolve every configured tier's type and validate its options, building nothing.

    Raises :class:`lmplug.errors.PluginUnavailable` for a type no plugin provides and
    :class:`lmplug.errors.ConfigError` (with ``tiers[i].key`` paths) for bad options.
    """
    planned = []
    for index, entry in enumerate(config.tiers):
        tier_type = host.resolve_tier_type(entry.type)
        try:
            options = tier_type.config_model.model_validate(entry.options)
        except ValidationError as exc:
            raise config_error(exc, prefix=f"tiers[{index}]") from None
        planned.append(PlannedTier(index, entry, tier_type, options))
    return planned


def build_tier(
    config: LmplugConfig,
    plan: PlannedTier,
    layout: KVLayout,
    fingerprint: bytes,
    report_evicted: Callable[[str, Sequence[ChunkKey]], None],
    plugins: PluginHost | None = None,
) -> Tier:
    """Call the tier type's factory and check that it returned a :class:`lmplug.Tier`."""
    context = TierContext(
        name=plan.entry.tier_name,
        type=plan.entry.type,
        config=config,
        layout=layout,
        fingerprint=fingerprint,
        report_evicted=report_evicted,
        plugins=plugins,
    )
    try:
        tier = plan.tier_type.factory(context, plan.options)
    except LmplugError:
        raise
    except Exception as exc:
        raise PluginError(
            f"could not build tier {context.name!r} (type {plan.tier_type.name!r}): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(tier, Tier):
        raise PluginContractError(
            f"the factory of tier type {plan.tier_type.name!r} returned {type(tier).__qualname__}, not an lmplug.Tier"
        )
    return tier
