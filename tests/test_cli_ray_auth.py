from __future__ import annotations

from typing import Any

import pytest

from serving import cli


def test_ray_init_turns_on_token_auth_for_an_explicit_address(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray._private.authentication import authentication_token_setup

    calls: list[dict[str, Any]] = []
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(
        authentication_token_setup, "maybe_enable_token_auth_if_token_available", lambda **kw: calls.append(kw)
    )
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    cli._ray_init(address="10.0.0.1:6379")
    assert calls == [{"warn_if_disabled": False}, {"address": "10.0.0.1:6379"}]


def test_ray_init_explains_a_rejected_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(**kwargs: Any) -> None:
        try:  # the shape ray.init raises: ConnectionError from a RuntimeError holding the GCS client's traceback
            raise RuntimeError("ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: token is missing")
        except RuntimeError as error:
            raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}") from error

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # also keeps _ray_init from changing this process's Ray config
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(SystemExit, match=r"10\.0\.0\.1:6379 requires token authentication.*RAY_AUTH_MODE=disabled"):
        cli._ray_init(address="10.0.0.1:6379")


def test_ray_init_passes_other_connection_errors_through(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def unreachable(**kwargs: Any) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(ConnectionError):
        cli._ray_init(address="10.0.0.1:6379")
