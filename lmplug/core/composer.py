"""Composing the configured tier stack from the tier types that plugins registered.

:func:`plan_tiers` resolves and validates (what ``lmplug config check`` runs), and
:func:`compose` builds, opens and binds the tiers into a :class:`Pipeline`.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from lmplug.core.config import LmplugConfig, TierConfig, config_error
from lmplug.core.layout import KVLayout
from lmplug.core.memory import ChunkAllocator, HeapAllocator
from lmplug.core.pipeline import FailureReport, Pipeline, TierSlot, bind_tier
from lmplug.core.tier import Capability, Holdings, Registries, Tier, TierContext, TierType
from lmplug.errors import LmplugError, PluginContractError, PluginError


class Plugins(Registries, Protocol):
    """What composition looks up among the loaded plugins (the plugin host satisfies it)."""

    def resolve_tier_type(self, type_name: str) -> TierType[Any]: ...


@dataclass(frozen=True, slots=True)
class PlannedTier:
    """A configured tier whose type resolved and whose options validated."""

    index: int
    entry: TierConfig
    tier_type: TierType[Any]
    options: BaseModel


def plan_tiers(config: LmplugConfig, plugins: Plugins) -> list[PlannedTier]:
    """Resolve every configured tier's type and validate its options, building nothing.

    Options are validated with ``context={"plugins": plugins}``, so a tier's config model
    can check what depends on other plugins (a remote tier's connector options) here.
    Raises :class:`lmplug.errors.PluginUnavailable` for a type no plugin provides and
    :class:`lmplug.errors.ConfigError` (with ``tiers[i].key`` paths) for bad options.
    """
    planned = []
    for index, entry in enumerate(config.tiers):
        tier_type = plugins.resolve_tier_type(entry.type)
        try:
            options = tier_type.config_model.model_validate(entry.options, context={"plugins": plugins})
        except ValidationError as exc:
            raise config_error(exc, prefix=f"tiers[{index}]") from None
        planned.append(PlannedTier(index, entry, tier_type, options))
    return planned


def build_tier(
    config: LmplugConfig,
    plan: PlannedTier,
    layout: KVLayout,
    fingerprint: bytes,
    holdings: Holdings,
    plugins: Registries | None = None,
) -> Tier:
    """Call the tier type's factory and check that it returned a :class:`lmplug.tierkit.Tier`."""
    context = TierContext(
        name=plan.entry.tier_name,
        type=plan.entry.type,
        config=config,
        layout=layout,
        fingerprint=fingerprint,
        _holdings=holdings,
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
            f"the factory of tier type {plan.tier_type.name!r} returned {type(tier).__qualname__}, "
            "not an lmplug.tierkit.Tier"
        )
    return tier


async def compose(
    config: LmplugConfig,
    plugins: Plugins,
    layout: KVLayout,
    fingerprint: bytes,
    holdings: Holdings,
    report_failure: FailureReport,
    stack: AsyncExitStack,
) -> Pipeline:
    """Build and open the configured tiers (``stack`` closes them) and bind them into a pipeline.

    The pipeline's chunk allocator is the first tier's that provides one (host memory that
    other tiers read into and promote to), else a heap allocator; every tier gets it once
    all are built.
    """
    slots: list[TierSlot] = []
    for plan in plan_tiers(config, plugins):
        tier = build_tier(config, plan, layout, fingerprint, holdings, plugins)
        await stack.enter_async_context(tier)
        slots.append(bind_tier(plan.entry.tier_name, tier))
    provided = (slot.tier.allocator for slot in slots if Capability.PROVIDES_ALLOCATOR in slot.tier.capabilities)
    allocator: ChunkAllocator = next((found for found in provided if found is not None), None) or HeapAllocator(layout)
    pipeline = Pipeline(slots, layout, report_failure, allocator, config.chunk_size)
    for slot in slots:
        slot.tier.context.bind_allocator(allocator)
        slot.tier.context.bind_local_tiers(partial(pipeline.local_tiers, slot.tier))
    return pipeline
