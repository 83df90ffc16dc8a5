"""The credential check alone, side by side: ``Authenticator.authenticate`` with an API key and with an OAuth
access token, both warm (as every call after a partner's first), and a token's first verification (signature and
claims: once per token, then cached until it expires). CPU time per call (``time.process_time``), in-process,
on a SQLite partner store.

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/bench_auth.py [--calls 200000] [--rounds 5]

The whole-request figure (the gateway's CPU per request with each credential) is ``bench.py --rows cpu``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from serving.identity.scopes import ALL_SCOPES
from serving.identity.tokens import TokenIssuer, TokenVerifier
from serving.partners.auth import Authenticator
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving.storage.database import Database


async def per_call_us(check: Callable[[str], Awaitable[object]], credential: str, calls: int) -> float:
    """Each call gets its own copy of the credential, as each request brings a new string (whose hash, for the
    token cache's lookup, is computed afresh)."""
    copies = [credential[:1] + credential[1:] for _ in range(calls)]
    started = time.process_time()
    for copy in copies:
        await check(copy)
    return (time.process_time() - started) * 1e6 / calls


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = PartnerStore(Database(str(Path(tmp) / "partners.db")))
        partner = store.create_partner("bench", plan="unlimited")
        api_key = store.issue_key(partner.id)
        client, secret = store.clients.create(partner.id, "bench", frozenset(ALL_SCOPES))
        issuer_name = Settings().oauth_issuer
        issuer = TokenIssuer(store.client_owner, store.signing.signing_key, issuer_name, 3600)
        token = str(issuer.issue(client.client_id, secret, None)["access_token"])
        verifier = TokenVerifier(store.signing.public_keys, issuer_name, 3600)
        auth = Authenticator(store, ttl_s=3600.0, tokens=verifier)
        await auth.authenticate(api_key)
        await auth.authenticate(token)  # both warm: the owner lookups and the token are cached
        key_us, token_us = [], []
        for _ in range(args.rounds):
            key_us.append(await per_call_us(auth.authenticate, api_key, args.calls))
            token_us.append(await per_call_us(auth.authenticate, token, args.calls))
        fresh = [str(issuer.issue(client.client_id, secret, None)["access_token"]) for _ in range(2000)]
        started = time.process_time()
        for new in fresh:  # each token verified for the first time (signature, claims); owners cached
            await auth.authenticate(new)
        first_us = (time.process_time() - started) * 1e6 / len(fresh)
        auth.close()
        store.close()
    key, tok = statistics.median(key_us), statistics.median(token_us)
    print(f"API key, warm:                 {key:7.2f} µs CPU per call (median of {args.rounds} x {args.calls})")
    print(f"OAuth access token, warm:      {tok:7.2f} µs CPU per call")
    print(f"OAuth access token, first use: {first_us:7.2f} µs CPU per call (EdDSA verify + claims, then cached)")
    print(f"ratio token ÷ key, warm:       {tok / key:7.2f} (target ≤ 1.0)")


if __name__ == "__main__":
    asyncio.run(main())
