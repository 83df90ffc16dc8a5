"""The gateway's readiness as its watcher keeps it (in-process, the Serve controller faked): probes never wait on
the controller, and while the controller cannot answer (a head restart) the last answer stands."""

from __future__ import annotations

import pytest

from serving.gateway import app
from serving.gateway.app import _Readiness
from serving.models.deployment import can_serve


class Controller:
    """Stands in for ``models_state``: an answer, or an error while the head is down."""

    def __init__(self) -> None:
        self.answer: tuple[bool, frozenset[str]] = (True, frozenset({"m-embed"}))
        self.down = False
        self.asked = 0

    def __call__(self, app_names: list[str]) -> tuple[bool, frozenset[str]]:
        self.asked += 1
        if self.down:
            raise ConnectionError("GCS unreachable")
        return self.answer


@pytest.fixture
def controller(monkeypatch: pytest.MonkeyPatch) -> Controller:
    fake = Controller()
    monkeypatch.setattr(app, "models_state", fake)
    return fake


def test_loading_until_the_first_answer_then_ready(controller: Controller) -> None:
    readiness = _Readiness(["m-embed"])
    controller.down = True
    readiness.refresh()
    assert (readiness(), readiness.serving) == ("loading", None)
    controller.down = False
    readiness.refresh()
    assert (readiness(), readiness.serving) == ("ready", frozenset({"m-embed"}))


def test_the_last_answer_stands_while_the_controller_is_down(controller: Controller) -> None:
    readiness = _Readiness(["m-embed"])
    readiness.refresh()
    controller.down = True
    for _ in range(3):
        readiness.refresh()
    assert (readiness(), readiness.serving, readiness.unreachable_since is not None) == (
        "ready",
        frozenset({"m-embed"}),
        True,
    )
    controller.down, controller.answer = False, (False, frozenset())  # back, and the model lost its replicas
    readiness.refresh()
    assert (readiness(), readiness.serving, readiness.unreachable_since) == ("loading", frozenset(), None)


def test_probes_read_the_state_without_asking_the_controller(controller: Controller) -> None:
    readiness = _Readiness(["m-embed"])
    readiness.refresh()
    assert [readiness() for _ in range(5)] == ["ready"] * 5
    assert controller.asked == 1
    readiness.stopping = True
    assert readiness() == "draining"
    readiness.drained = True
    assert readiness() == "drained"


@pytest.mark.parametrize(
    ("states", "serves"),
    [
        ({"RUNNING": 1}, True),
        ({"RECOVERING": 1}, True),  # a restarted controller re-attaching to a live replica
        ({"UPDATING": 1, "STARTING": 1}, True),
        ({"STARTING": 2}, False),
        ({"STOPPING": 1, "RUNNING": 0}, False),
        ({}, False),
    ],
)
def test_which_replica_states_can_serve(states: dict[str, int], serves: bool) -> None:
    assert can_serve(states) is serves
