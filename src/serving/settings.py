"""Every setting, typed, read once from the environment (prefix ``SERVING_``) and validated at startup.

Nothing else reads the environment; components get the values they need passed in.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting has a value that cannot be used; raised at startup."""


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name} must be one of 1/0, true/false, yes/no, on/off; got {raw!r}")


@dataclass(frozen=True)
class Limits:
    """Edge validation limits; documented in the README."""

    max_texts_per_call: int = 64
    max_text_tokens: int = 256
    max_request_bytes: int = 1_048_576
    max_prompt_tokens: int = 2048
    max_output_tokens: int = 512
    default_output_tokens: int = 128
    max_stop_sequences: int = 4
    max_labels: int = 32


@dataclass(frozen=True)
class Batching:
    """Gateway micro-batching per model: flush on size or on deadline."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0  # upper bound while the pipeline is full
    max_inflight: int = 2  # batches out per model before requests accumulate (0: flush only on size/deadline)


@dataclass(frozen=True)
class Admission:
    """Fair queuing in front of each model (per gateway replica)."""

    max_queue_per_partner: int = 64
    max_wait_s: float = 10.0
    fair: bool = True  # False: one first-come-first-served queue (to measure what fair queuing buys)


@dataclass(frozen=True)
class Webhooks:
    """Usage alerts by webhook (docs/api.md#usage-alerts-webhooks, decision 0018); every gateway replica runs both
    loops, and the database decides which replica sends a delivery."""

    enabled: bool = True  # False: this replica neither evaluates thresholds nor sends (the routes still work)
    evaluate_interval_s: float = 30.0  # how often month-to-date usage is compared with the thresholds
    dispatch_interval_s: float = 1.0  # how often due deliveries are looked for (at once after a new event)
    timeout_s: float = 10.0  # one attempt, connect to response headers
    max_attempts: int = 10  # attempts of one delivery before it is marked failed (a replay starts a new series)
    backoff_base_s: float = 30.0  # wait after the first failed attempt; doubles per attempt, with jitter
    backoff_max_s: float = 3600.0  # the longest wait between two attempts
    max_endpoints: int = 10  # registered endpoints per partner
    # Endpoints on loopback (plain http allowed there: development, tests). False on shared hosts: a partner's URL
    # could otherwise reach services that listen on the gateway's own loopback interface.
    allow_loopback: bool = True
    batch: int = 32  # deliveries one replica claims (and sends concurrently) per round


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("var")
    model_registry: Path | None = None
    model_cache_dir: Path | None = None
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # The ops listener: /metrics, /admin/v1, health and readiness. Never on the partner port; keep it private.
    ops_host: str = "127.0.0.1"
    ops_port: int = 8090
    # Gateway processes on this machine sharing the partner ports (SO_REUSEPORT); each gets its own ops port
    # (ops_port, ops_port + 1, ...) and journal. More than one needs redis_url (quota shared across processes).
    workers: int = 1
    # TLS on both partner ports (PEM files; the ops port stays plaintext and private). Both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    http_timeout_s: float = 60.0
    shutdown_grace_s: float = 20.0
    # After a graceful stop drained every request, the ops listener stays up until one more /metrics scrape reads
    # the final counters (only when something scraped this gateway before), at most this long.
    final_scrape_wait_s: float = 30.0
    ray_address: str | None = None
    # `gateway` only: start a zero-CPU Ray node of its own (a raylet next to the gateway) and attach to it, instead of
    # needing a raylet of the cluster's on this machine; with GCS fault tolerance the gateway then rides out a head
    # restart (decision 0015). Needs ray_address. The k8s gateway pods run this way.
    ray_own_node: bool = False
    ray_num_cpus: int | None = None
    serve_app_name: str = "models"
    # The price book (TOML) prepaid plans are charged from; None: the one shipped in serving.commerce. Billing must
    # read the same file (`serving run` passes it as BILLING_PRICE_BOOK) so both agree to the cent.
    price_book: Path | None = None
    demo_partner: str = "demo"
    auth_cache_ttl_s: float = 2.0
    # OAuth2 client credentials (docs/identity.md): access tokens live this long, and name this issuer and audience.
    oauth_token_ttl_s: float = 900.0
    oauth_issuer: str = "serving"
    # None: SQLite files under data_dir; "postgresql://..." at scale.
    database_url: str | None = None
    ledger_database_url: str | None = None
    # None: quota kept in-process (one gateway replica); "redis://..." when several replicas run.
    redis_url: str | None = None
    quota_failure_policy: str = "closed"  # when Redis is unreachable: "closed" rejects (503), "open" admits
    redis_timeout_s: float = 2.0  # past this a quota call counts as "Redis unreachable"
    quota_lease_s: float | None = None  # concurrency lease lifetime; None: http_timeout_s + admission wait + grace
    # Idempotency keys: a retry with the same key and body replays the stored outcome for this long; an outcome
    # larger than the cap is not kept (its retry is refused, never run twice). Redis when redis_url is set.
    idempotency_ttl_s: float = 86_400.0
    # A key sent with `Idempotency-Scope: retry` (the SDK's automatic keys) only covers that call's retries: its
    # outcome is kept this long, and no ledger read checks it. Must outlast the slowest series of retries.
    idempotency_retry_ttl_s: float = 600.0
    idempotency_max_bytes: int = 1_048_576
    admin_token: str | None = None
    # The admin CLI's caller (like its --token): the operator token a command runs as (docs/admin.md).
    operator_token: str | None = None
    gateway_id: str = "gateway-0"  # names this replica's usage journal; unique per replica sharing a data dir
    ledger_flush_interval_s: float = 0.05
    replica_poll_interval_s: float = 5.0  # how often the gateway reads replica counts and generation load (metrics)
    access_log: bool = True  # one JSON line per request on stderr (logger serving.access)
    event_loop: str = "uvloop"  # the gateway's event loop: "uvloop" (less CPU per request) or "asyncio"
    # How handle calls reach the model replicas: Serve's gRPC transport ("grpc", decision 0010) or Ray actor calls
    # ("actor", Serve's default; the switch back should a Ray upgrade change the private option underneath).
    ray_transport: str = "grpc"
    # Serve's router for the gateway's handles runs on the gateway's event loop (False: on Serve's router thread).
    ray_router_on_loop: bool = True
    tracing_exporter: str = "off"  # OpenTelemetry: "off", "console" or "otlp" (gRPC, to otlp_endpoint)
    otlp_endpoint: str | None = None  # e.g. http://otel-collector:4317; None: the exporter's default / OTEL_* env
    trace_sample_ratio: float = 1.0  # share of new traces sampled; a partner's sampled traceparent is followed
    log_level: str = "INFO"
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    admission: Admission = field(default_factory=Admission)
    webhooks: Webhooks = field(default_factory=Webhooks)

    @property
    def partners_db_url(self) -> str:
        return self.database_url or str(self.data_dir / "serving.db")

    @property
    def ledger_db_url(self) -> str:
        return self.ledger_database_url or self.database_url or str(self.data_dir / "ledger.db")

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal" / self.gateway_id

    @property
    def tls_pem(self) -> tuple[bytes, bytes] | None:
        """(certificate chain, private key) for the partner ports, or None: plaintext."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return self.tls_cert_file.read_bytes(), self.tls_key_file.read_bytes()

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def models_cache(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def demo_key_path(self) -> Path:
        return self.data_dir / "demo-api-key"

    def validate(self) -> Settings:
        for name in ("grpc_port", "http_port", "ops_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise SettingsError(f"{name} must be in 0..65535; got {port}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingsError("tls_cert_file and tls_key_file go together: set both (TLS) or neither (plaintext)")
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            try:  # a wrong pair must fail here, not as a bind error or a dead listener later
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.tls_cert_file, self.tls_key_file
                )
            except (OSError, ssl.SSLError) as exc:
                raise SettingsError(
                    f"tls_cert_file {self.tls_cert_file} and tls_key_file {self.tls_key_file} are not a usable PEM"
                    f" certificate chain and its private key: {exc}"
                ) from exc
        if self.workers < 1:
            raise SettingsError(f"workers must be >= 1; got {self.workers}")
        if self.ops_port and self.ops_port + self.workers - 1 > 65535:
            raise SettingsError(f"ops_port + workers - 1 must be <= 65535; got {self.ops_port + self.workers - 1}")
        if self.http_timeout_s <= 0 or self.shutdown_grace_s < 0 or self.final_scrape_wait_s < 0:
            raise SettingsError("http_timeout_s must be > 0, shutdown_grace_s and final_scrape_wait_s >= 0")
        if self.batching.max_batch_size < 1 or self.batching.max_wait_ms < 0:
            raise SettingsError("batching needs max_batch_size >= 1 and max_wait_ms >= 0")
        if self.ray_transport not in ("grpc", "actor"):
            raise SettingsError(f"ray_transport must be 'grpc' or 'actor'; got {self.ray_transport!r}")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise SettingsError(f"event_loop must be 'uvloop' or 'asyncio'; got {self.event_loop!r}")
        if self.quota_failure_policy not in ("closed", "open"):
            raise SettingsError(f"quota_failure_policy must be 'closed' or 'open'; got {self.quota_failure_policy!r}")
        if self.replica_poll_interval_s <= 0:
            raise SettingsError("replica_poll_interval_s must be > 0")
        if self.tracing_exporter not in ("off", "console", "otlp"):
            raise SettingsError(f"tracing_exporter must be off, console or otlp; got {self.tracing_exporter!r}")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise SettingsError("trace_sample_ratio must be in 0..1")
        if self.idempotency_retry_ttl_s < 4 * self.http_timeout_s:
            raise SettingsError(
                "idempotency_retry_ttl_s must cover 4 attempts of the longest call: >= 4 x http_timeout_s"
                f" ({4 * self.http_timeout_s:.0f} s); got {self.idempotency_retry_ttl_s:.0f} s"
            )
        if not self.gateway_id or "/" in self.gateway_id:
            raise SettingsError("gateway_id must be a non-empty name without '/'")
        hooks = self.webhooks
        if min(hooks.evaluate_interval_s, hooks.dispatch_interval_s, hooks.timeout_s) <= 0 or hooks.backoff_base_s < 0:
            raise SettingsError("webhooks need intervals and timeout_s > 0 and backoff_base_s >= 0")
        if hooks.max_attempts < 1 or hooks.max_endpoints < 1 or hooks.batch < 1:
            raise SettingsError("webhooks need max_attempts, max_endpoints and batch >= 1")
        if hooks.backoff_max_s < hooks.backoff_base_s:
            raise SettingsError("webhooks need backoff_max_s >= backoff_base_s")
        limits = self.limits
        if not 1 <= limits.default_output_tokens <= limits.max_output_tokens:
            raise SettingsError("limits need 1 <= default_output_tokens <= max_output_tokens")
        return self


def _convert(name: str, raw: str, kind: Any) -> Any:
    kinds = str(kind)
    try:
        if "bool" in kinds:
            return _parse_bool(name, raw)
        if "Path" in kinds:
            return Path(raw) if raw else None
        if "int" in kinds:
            return int(raw) if raw else None
        if "float" in kinds:
            return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: cannot parse {raw!r} ({exc})") from exc
    return raw or None if "None" in kinds else raw


def _overlay(obj: Any, env: Mapping[str, str], prefix: str) -> Any:
    changes: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in ("limits", "batching", "admission", "webhooks"):
            changes[f.name] = _overlay(value, env, f"{prefix}{f.name.upper()}_")
            continue
        key = f"{prefix}{f.name.upper()}"
        if key in env:
            changes[f.name] = _convert(key, env[key], f.type)
    return replace(obj, **changes)


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``SERVING_*`` variables (``SERVING_LIMITS_MAX_TEXTS_PER_CALL`` for nested ones)."""
    base: Settings = _overlay(Settings(), os.environ if env is None else env, "SERVING_")
    return replace(base, **overrides).validate()
