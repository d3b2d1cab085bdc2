"""lmplug-blend: CacheBlend for lmplug (see README.md)."""
