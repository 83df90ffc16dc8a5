"""API keys: ``sk_<key id>_<secret>``. The key id is a visible prefix for logs and lookups; the secret is
32 random bytes. Only a SHA-256 digest of the whole key is stored (the secret's entropy makes a slow hash
unnecessary) and digests are compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX = "sk"
_KEY_ID_BYTES = 6
_SECRET_BYTES = 32


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    digest: str


def new_key() -> tuple[str, ParsedKey]:
    """A fresh key (shown once) and what gets stored."""
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    parsed = parse_key(key)
    assert parsed is not None
    return key, parsed


def digest(secret: str) -> str:
    """What is stored of a high-entropy secret (API keys, OAuth client secrets, operator tokens): its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()


def digest_matches(secret: str, stored_digest: str) -> bool:
    """Whether ``secret`` is the one ``stored_digest`` was made from, in constant time."""
    return hmac.compare_digest(digest(secret), stored_digest)


def parse_key(key: str) -> ParsedKey | None:
    """The key id and digest, or None when the key is not shaped like one of ours."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or len(parts[1]) != 2 * _KEY_ID_BYTES or len(parts[2]) < 40:
        return None
    return ParsedKey(key_id=parts[1], digest=digest(key))


def matches(parsed: ParsedKey, stored_digest: str) -> bool:
    return hmac.compare_digest(parsed.digest, stored_digest)
