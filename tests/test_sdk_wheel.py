"""The partner SDK as a partner gets it: the wheel built from sdk/python, installed into a fresh venv that has no
torch, Ray, transformers or server code, calling the running stack over plaintext and over TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import ROOT, running_gateway
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from serving.gateway.app import Gateway
from serving.models.registry import ModelSpec
from serving.partners.store import PartnerStore
from serving.settings import Settings, SettingsError

CALLS = Path(__file__).parent / "sdk" / "fresh_venv_calls.py"
SERVER_ONLY = ("torch", "ray", "transformers", "serving", "fastapi")


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False, **kwargs)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _checkout_copy(source: Path, target: Path) -> Path:
    """sdk/python as a clean checkout has it: protos copied in, no generated stubs, no build leftovers."""

    def leave_out(directory: str, names: list[str]) -> set[str]:
        generated = {"v1"} if Path(directory).name == "serving_sdk" else set()
        return generated | {n for n in names if n == "build" or n.endswith(".egg-info") or n == "__pycache__"}

    shutil.copytree(source, target, symlinks=False, ignore=leave_out)
    return target


@pytest.fixture(scope="module")
def sdk_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel sdk/python``: an isolated build (setuptools + grpcio-tools from PyPI) that generates the stubs."""
    out = tmp_path_factory.mktemp("wheel")
    source = _checkout_copy(ROOT / "sdk" / "python", tmp_path_factory.mktemp("sdk") / "python")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)])
    (wheel,) = out.glob("serving_partner_sdk-*.whl")
    return wheel


@pytest.fixture(scope="module")
def fresh_python(sdk_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(sdk_wheel)])
    return python


def test_the_wheel_carries_generated_stubs_and_only_wire_dependencies(sdk_wheel: Path) -> None:
    with zipfile.ZipFile(sdk_wheel) as wheel:
        names = set(wheel.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        lines = wheel.read(metadata).decode().splitlines()
    requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    for module in ("common_pb2", "inference_pb2", "models_pb2", "usage_pb2"):
        assert f"serving_sdk/v1/{module}.py" in names and f"serving_sdk/v1/{module}.pyi" in names
    assert "serving_sdk/v1/inference_pb2_grpc.py" in names and "serving_sdk/py.typed" in names
    assert not any(n.startswith("serving/") for n in names), "the SDK must not ship server code"
    assert sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires) == [
        "googleapis-common-protos",
        "grpcio",
        "protobuf",
    ]


def test_the_fresh_venv_has_no_server_dependencies(fresh_python: Path) -> None:
    probe = f"import importlib.util as u, json; print(json.dumps([m for m in {SERVER_ONLY!r} if u.find_spec(m)]))"
    assert json.loads(_run([str(fresh_python), "-c", probe]).stdout) == []


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, its own CA (the client trusts it through ``ca_file``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serving test gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "gateway.crt", directory / "gateway.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest_asyncio.fixture(loop_scope="session")
async def tls_gateway(
    settings: Settings,
    specs: list[ModelSpec],
    ray_models: dict[str, Any],
    store: PartnerStore,
    tmp_path: Path,
) -> AsyncIterator[tuple[Gateway, Path]]:
    cert_file, key_file = _self_signed(tmp_path)
    overrides = {"tls_cert_file": cert_file, "tls_key_file": key_file, "gateway_id": "tls-1"}
    async with running_gateway(settings, specs, ray_models, store, **overrides) as gw:
        yield gw, cert_file


async def _partner_calls(
    python: Path, store: PartnerStore, gw: Gateway, name: str, ca_file: Path | None
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Runs the calls, then (the ledger flushed) the usage read, in the fresh venv with the key in SERVING_API_KEY."""
    partner = store.create_partner(name, plan="unlimited")
    env = {**os.environ, "SERVING_API_KEY": store.issue_key(partner.id)}
    target = f"127.0.0.1:{gw.grpc_port}"
    tail = [str(ca_file)] if ca_file is not None else []

    def run(mode: str) -> dict[str, Any]:
        done = _run([str(python), str(CALLS), mode, target, *tail], env=env)
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    calls = await asyncio.to_thread(run, "calls")
    await asyncio.to_thread(gw.ledger.flush)
    return calls, await asyncio.to_thread(run, "usage"), partner.id


def _check(calls: dict[str, Any], usage: dict[str, Any], partner_id: str) -> None:
    assert calls["dimensions"] == [384, 384] and all(abs(n - 1.0) < 1e-3 for n in calls["norms"])
    assert len(calls["embed_request_id"]) == 32  # the SDK's automatic idempotency key, echoed back
    assert calls["label"] == "positive"
    assert calls["streamed"] == calls["text"] and "Paris" in calls["text"]
    assert calls["finish_reason"] in ("stop", "length") and calls["output_tokens"] > 0
    assert usage == {"partner_id": partner_id, "requests": {"embed": 1, "classify": 1, "generate": 1}}


async def test_the_installed_sdk_calls_the_stack_over_plaintext(
    fresh_python: Path, gateway: Gateway, store: PartnerStore
) -> None:
    _check(*await _partner_calls(fresh_python, store, gateway, "sdk-plaintext", None))


async def test_the_installed_sdk_calls_the_stack_over_tls(
    fresh_python: Path, tls_gateway: tuple[Gateway, Path], store: PartnerStore
) -> None:
    gw, cert_file = tls_gateway
    _check(*await _partner_calls(fresh_python, store, gw, "sdk-tls", cert_file))
    # The HTTP front door serves TLS with the same certificate (the OpenAI routes through https).
    partner = store.create_partner("https-client", plan="unlimited")
    headers = {"authorization": f"Bearer {store.issue_key(partner.id)}"}
    context = ssl.create_default_context(cafile=str(cert_file))
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{gw.http_port}", verify=context) as https:
        embedded = await https.post("/v1/embeddings", headers=headers, json={"model": "minilm-l6", "input": "hi"})
    assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) == 384
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}") as plain:
        with pytest.raises(httpx.TransportError):  # no plaintext on a TLS port
            await plain.get("/healthz")
    # Without the CA the handshake fails: the channel really is TLS and really verifies.
    env = {**os.environ, "SERVING_API_KEY": "not-used"}
    refused = await asyncio.to_thread(
        subprocess.run,
        [str(fresh_python), str(CALLS), "usage", f"127.0.0.1:{gw.grpc_port}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert refused.returncode != 0 and "UNAVAILABLE" in refused.stderr


def test_a_certificate_and_key_that_do_not_match_fail_at_startup(settings: Settings, tmp_path: Path) -> None:
    cert_file, _ = _self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = _self_signed(tmp_path / "other")
    with pytest.raises(SettingsError, match="not a usable PEM certificate chain and its private key"):
        replace(settings, tls_cert_file=cert_file, tls_key_file=other_key).validate()
    with pytest.raises(SettingsError, match="go together"):
        replace(settings, tls_cert_file=cert_file).validate()
