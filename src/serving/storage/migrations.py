"""Schema migrations, applied in order at startup; each runs once per database, in a transaction.

Add a migration by appending to ``MIGRATIONS``; never edit one that has shipped. The SQL is portable
between SQLite and PostgreSQL (TEXT / BIGINT / DOUBLE PRECISION, ``ON CONFLICT``).
"""

from __future__ import annotations

from serving.storage.database import Database

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "partners, plans and api keys",
        [
            """CREATE TABLE IF NOT EXISTS plans (
                name TEXT PRIMARY KEY,
                requests_per_minute BIGINT NOT NULL,
                tokens_per_minute BIGINT NOT NULL,
                max_concurrent BIGINT NOT NULL,
                monthly_tokens BIGINT NOT NULL,
                allowed_models TEXT NOT NULL,
                weight DOUBLE PRECISION NOT NULL,
                ip_allowlist TEXT NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS partners (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                plan TEXT NOT NULL REFERENCES plans(name),
                created_at DOUBLE PRECISION NOT NULL,
                disabled INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE IF NOT EXISTS api_keys (
                key_id TEXT PRIMARY KEY,
                partner_id TEXT NOT NULL REFERENCES partners(id),
                digest TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION
            )""",
            "CREATE INDEX IF NOT EXISTS api_keys_partner ON api_keys(partner_id)",
        ],
    ),
    (
        2,
        "usage ledger",
        [
            """CREATE TABLE IF NOT EXISTS usage_records (
                partner_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                key_id TEXT NOT NULL,
                model TEXT NOT NULL,
                operation TEXT NOT NULL,
                input_tokens BIGINT NOT NULL,
                output_tokens BIGINT NOT NULL,
                status TEXT NOT NULL,
                queue_ms DOUBLE PRECISION NOT NULL,
                latency_ms DOUBLE PRECISION NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                finished_at DOUBLE PRECISION NOT NULL,
                day TEXT NOT NULL,
                PRIMARY KEY (partner_id, request_id)
            )""",
            "CREATE INDEX IF NOT EXISTS usage_partner_day ON usage_records(partner_id, day)",
        ],
    ),
    (
        3,
        "oauth clients, token signing keys, api key scopes",
        [
            "ALTER TABLE api_keys ADD COLUMN scopes TEXT",  # space-separated; NULL: every scope
            """CREATE TABLE IF NOT EXISTS oauth_clients (
                client_id TEXT PRIMARY KEY,
                partner_id TEXT NOT NULL REFERENCES partners(id),
                name TEXT NOT NULL,
                digest TEXT NOT NULL,
                scopes TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                disabled_at DOUBLE PRECISION
            )""",
            "CREATE INDEX IF NOT EXISTS oauth_clients_partner ON oauth_clients(partner_id)",
            """CREATE TABLE IF NOT EXISTS signing_keys (
                kid TEXT PRIMARY KEY,
                private_pem TEXT NOT NULL,
                public_jwk TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                retired_at DOUBLE PRECISION
            )""",
        ],
    ),
    (
        4,
        "operators and the audit log",
        [
            """CREATE TABLE IF NOT EXISTS operators (
                name TEXT PRIMARY KEY,
                token_id TEXT NOT NULL UNIQUE,
                digest TEXT NOT NULL,
                role TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                disabled_at DOUBLE PRECISION
            )""",
            # Append-only: rows are inserted with the change they record and never updated or deleted.
            """CREATE TABLE IF NOT EXISTS audit_log (
                id TEXT PRIMARY KEY,
                at DOUBLE PRECISION NOT NULL,
                actor TEXT NOT NULL,
                actor_role TEXT NOT NULL,
                action TEXT NOT NULL,
                target_kind TEXT NOT NULL,
                target_id TEXT NOT NULL,
                before_state TEXT,
                after_state TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log(at)",
            "CREATE INDEX IF NOT EXISTS audit_log_actor ON audit_log(actor, at)",
            "CREATE INDEX IF NOT EXISTS audit_log_target ON audit_log(target_kind, target_id, at)",
        ],
    ),
    (
        5,
        "usage alert webhooks: endpoints, events, deliveries and their attempts",
        [
            # The signing secret itself is stored (signing needs it); blanked when the endpoint is deleted.
            """CREATE TABLE IF NOT EXISTS webhook_endpoints (
                id TEXT PRIMARY KEY,
                partner_id TEXT NOT NULL REFERENCES partners(id),
                url TEXT NOT NULL,
                thresholds TEXT NOT NULL,
                secret TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                deleted_at DOUBLE PRECISION
            )""",
            "CREATE INDEX IF NOT EXISTS webhook_endpoints_partner ON webhook_endpoints(partner_id)",
            # One event per partner, metric, period and threshold, whichever replica sees the crossing first.
            """CREATE TABLE IF NOT EXISTS webhook_events (
                id TEXT PRIMARY KEY,
                partner_id TEXT NOT NULL,
                type TEXT NOT NULL,
                metric TEXT NOT NULL,
                period TEXT NOT NULL,
                threshold BIGINT NOT NULL,
                payload TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                UNIQUE (partner_id, metric, period, threshold)
            )""",
            # One delivery per event and endpoint; lease_owner/lease_until: the replica sending it now.
            """CREATE TABLE IF NOT EXISTS webhook_deliveries (
                id TEXT PRIMARY KEY,
                event_id TEXT NOT NULL REFERENCES webhook_events(id),
                endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints(id),
                partner_id TEXT NOT NULL,
                status TEXT NOT NULL,
                attempts BIGINT NOT NULL,
                series_start BIGINT NOT NULL,
                next_attempt_at DOUBLE PRECISION NOT NULL,
                lease_owner TEXT,
                lease_until DOUBLE PRECISION,
                last_status_code BIGINT,
                last_error TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                delivered_at DOUBLE PRECISION,
                UNIQUE (event_id, endpoint_id)
            )""",
            "CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries(status, next_attempt_at)",
            "CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint ON webhook_deliveries(endpoint_id, created_at)",
            """CREATE TABLE IF NOT EXISTS webhook_attempts (
                delivery_id TEXT NOT NULL REFERENCES webhook_deliveries(id),
                number BIGINT NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                duration_ms DOUBLE PRECISION NOT NULL,
                status_code BIGINT,
                error TEXT,
                PRIMARY KEY (delivery_id, number)
            )""",
        ],
    ),
    (
        6,
        "prepaid plans, credit grants and their draws",
        [
            "ALTER TABLE plans ADD COLUMN prepaid BIGINT NOT NULL DEFAULT 0",
            # Amounts are decimal strings (exact); priority: lower is drawn first.
            """CREATE TABLE IF NOT EXISTS credit_grants (
                id TEXT PRIMARY KEY,
                partner_id TEXT NOT NULL REFERENCES partners(id),
                kind TEXT NOT NULL,
                amount TEXT NOT NULL,
                priority BIGINT NOT NULL,
                granted_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION,
                note TEXT NOT NULL,
                granted_by TEXT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS credit_grants_partner ON credit_grants(partner_id)",
            # What each closed invoice drew from each grant (written by billing when it closes a period).
            """CREATE TABLE IF NOT EXISTS credit_draws (
                period TEXT NOT NULL,
                grant_id TEXT NOT NULL REFERENCES credit_grants(id),
                partner_id TEXT NOT NULL,
                amount TEXT NOT NULL,
                period_end DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (period, grant_id)
            )""",
            # Every partner a closed period invoiced (with or without draws): how far closed invoices account for it.
            """CREATE TABLE IF NOT EXISTS credit_closes (
                period TEXT NOT NULL,
                partner_id TEXT NOT NULL,
                period_end DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (period, partner_id)
            )""",
        ],
    ),
]


_MIGRATION_LOCK = 0x5E2F1A6  # an arbitrary, fixed pg_advisory_xact_lock key for this schema


def migrate(db: Database) -> int:
    """Applies every pending migration; returns the schema version."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL)")
    applied = {row[0] for row in db.query("SELECT version FROM schema_migrations")}
    for version, name, statements in MIGRATIONS:
        if version in applied:
            continue
        with db.transaction():
            # Processes starting together (gateway replicas, the CLI) must not both apply a migration: one waits
            # for the other (SQLite's BEGIN IMMEDIATE already serialises writers), then finds it applied.
            if db.is_postgres:
                db.query("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            if db.one("SELECT version FROM schema_migrations WHERE version = ?", (version,)) is not None:
                continue
            for statement in statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (?, ?) ON CONFLICT (version) DO NOTHING",
                (version, name),
            )
    return max(v for v, _, _ in MIGRATIONS)
