"""What a credential may do. An API key without scopes may do everything (as before scopes existed); an OAuth
client always has an explicit set, and its access tokens carry the subset they were issued for."""

from __future__ import annotations

from serving.domain import Task

EMBED = "embed"
CLASSIFY = "classify"
GENERATE = "generate"
USAGE_READ = "usage:read"  # also lists webhook endpoints and their deliveries
WEBHOOKS_WRITE = "webhooks:write"  # registers and deletes usage-alert webhook endpoints, replays deliveries
ALL_SCOPES: tuple[str, ...] = (EMBED, CLASSIFY, GENERATE, USAGE_READ, WEBHOOKS_WRITE)

_TASK_SCOPE = {Task.EMBED: EMBED, Task.CLASSIFY: CLASSIFY, Task.GENERATE: GENERATE}


class ScopeError(ValueError):
    """A scope string names a scope that does not exist."""


def scope_for(task: Task) -> str:
    return _TASK_SCOPE[task]


def parse_scopes(raw: str | list[str] | tuple[str, ...]) -> frozenset[str]:
    """``"embed generate"`` (OAuth's space-separated form) or a list; every name must be a known scope."""
    names = raw.split() if isinstance(raw, str) else [part for item in raw for part in item.split()]
    unknown = sorted(set(names) - set(ALL_SCOPES))
    if unknown:
        raise ScopeError(f"unknown scope(s) {', '.join(unknown)}; the scopes are: {' '.join(ALL_SCOPES)}")
    return frozenset(names)


def format_scopes(scopes: frozenset[str]) -> str:
    """Space-separated, in the canonical order (stable for tokens, storage and display)."""
    return " ".join(scope for scope in ALL_SCOPES if scope in scopes)
