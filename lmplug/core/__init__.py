"""The lmplug core: config, keys, memory, tiers, pipeline, cache."""
