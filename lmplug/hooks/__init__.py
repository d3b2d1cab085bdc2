"""The plugin contract (specs), plugin loading (manager) and the async dispatcher."""
