"""LightningModules, objective adapters, callbacks and stage builders (the only layer that imports Lightning)."""
