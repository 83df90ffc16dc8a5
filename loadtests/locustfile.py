"""The release gate's load: gRPC and HTTP users acting for several partners on different plans.

``loadtests/gate.py`` (``make loadtest``) runs it headless and judges the result. To watch it in locust's web
UI against a running stack, first let the gate create the partners (``gate.py --setup-only``), then:

    .venv/bin/locust -f loadtests/locustfile.py --run-file var/loadtest/run.json --host http://127.0.0.1:8000
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gatelib.grpc_user import GrpcApiUser
from gatelib.http_user import HttpApiUser
from gatelib.outcomes import RunFile, Tracker
from locust import events
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

__all__ = ["GrpcApiUser", "HttpApiUser"]


@events.init_command_line_parser.add_listener
def add_arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument("--run-file", required=True, help="run.json written by the gate: partners, keys, mix")
    parser.add_argument("--outcomes-file", default="", help="where to write every request's outcome (JSON)")


@events.init.add_listener
def on_init(environment: Environment, **_kwargs: Any) -> None:
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()  # before any channel exists: gRPC calls yield to other users
    options = environment.parsed_options
    assert options is not None
    run = RunFile.read(Path(options.run_file))
    # The mix of user kinds comes from the gate's config.
    GrpcApiUser.weight = run.grpc_weight
    HttpApiUser.weight = run.http_weight
    if options.outcomes_file:
        tracker = Tracker(Path(options.outcomes_file))
        environment.events.request.add_listener(tracker.on_request)
        environment.events.test_start.add_listener(tracker.on_test_start)
        # ``quit`` fires once the users have stopped and locust's statistics are final.
        environment.events.quit.add_listener(lambda **_kw: tracker.write(environment.stats))
