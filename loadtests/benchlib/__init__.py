"""Modules of loadtests/bench.py (run that script; nothing here is a public API)."""
