"""Partners and their API keys."""
