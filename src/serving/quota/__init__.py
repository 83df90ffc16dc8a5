"""Quota (requests, tokens, concurrency, monthly budget) and fair admission."""
