"""The keys that sign access tokens: Ed25519 (JWS ``EdDSA``), kept in the partner database so every gateway
replica signs and verifies with the same set.

The newest key that is not retired signs; every key that is not retired verifies and is published in the JWKS.
``rotate()`` adds a new signing key and retires all but it and its predecessor, so two keys are valid at once:
tokens signed just before a rotation stay valid until they expire. Rotate at most once per token lifetime, or a
second rotation retires the key of tokens that have not expired yet (they are then refused as signed by an
unknown key). The private keys are stored as PEM in the database: whoever reads that table can mint tokens, as
whoever reads the API key digests cannot (documented in docs/identity.md).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm

from serving.storage.database import Database


@dataclass(frozen=True)
class PublicKey:
    kid: str
    key: Ed25519PublicKey
    jwk: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey


class SigningKeys:
    def __init__(self, db: Database) -> None:
        self.db = db  # migrated by PartnerStore (same database)

    def _create(self) -> str:
        kid = f"k_{secrets.token_hex(8)}"
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
        jwk.update({"kid": kid, "alg": "EdDSA", "use": "sig"})
        self.db.execute(
            "INSERT INTO signing_keys (kid, private_pem, public_jwk, created_at) VALUES (?, ?, ?, ?)",
            (kid, pem, json.dumps(jwk, sort_keys=True), time.time()),
        )
        return kid

    def ensure_active(self) -> str:
        """The signing key's id, creating the first key when there is none."""
        row = self.db.one("SELECT kid FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC LIMIT 1")
        return str(row[0]) if row is not None else self._create()

    def rotate(self) -> tuple[str, list[str]]:
        """A new signing key; returns its id and the ids retired (all but the new key and its predecessor)."""
        with self.db.transaction():
            kid = self._create()
            keep = [row[0] for row in self.db.query(
                "SELECT kid FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC LIMIT 2"
            )]  # fmt: skip
            retired = [
                row[0]
                for row in self.db.query("SELECT kid FROM signing_keys WHERE retired_at IS NULL")
                if row[0] not in keep
            ]
            for old in retired:
                self.db.execute("UPDATE signing_keys SET retired_at = ? WHERE kid = ?", (time.time(), old))
        return kid, retired

    def signing_key(self) -> SigningKey:
        """The newest key that is not retired (created when there is none)."""
        kid = self.ensure_active()
        row = self.db.one("SELECT private_pem FROM signing_keys WHERE kid = ?", (kid,))
        assert row is not None
        private = serialization.load_pem_private_key(str(row[0]).encode(), password=None)
        assert isinstance(private, Ed25519PrivateKey)
        return SigningKey(kid, private)

    def public_keys(self) -> list[PublicKey]:
        """Every key that verifies (not retired), newest first."""
        rows = self.db.query(
            "SELECT kid, public_jwk, created_at FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC"
        )
        keys = []
        for kid, raw, created_at in rows:
            jwk = json.loads(raw)
            key = OKPAlgorithm.from_jwk(jwk)
            assert isinstance(key, Ed25519PublicKey)
            keys.append(PublicKey(str(kid), key, jwk, float(created_at)))
        return keys

    def jwks(self) -> dict[str, Any]:
        """RFC 7517's JSON Web Key Set of the verifying keys (public halves only)."""
        return {"keys": [key.jwk for key in self.public_keys()]}
