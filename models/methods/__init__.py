"""The long-tail methods: one module per method, one registry (models/methods/registry.py)."""
