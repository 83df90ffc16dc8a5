"""Idempotency keys: replay of a retried request's original outcome (in-process or Redis)."""
