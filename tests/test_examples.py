"""The partner applications in examples/ run as programs against the real stack, and their output makes sense."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from serving.gateway.app import Gateway
from serving.partners.store import PartnerStore

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def partner_env(gateway: Gateway, store: PartnerStore) -> dict[str, str]:
    """What a partner sets: the key, and where make run's gateway would be (here the test gateway)."""
    partner = store.create_partner("examples", plan="unlimited")
    return {
        **os.environ,
        "SERVING_API_KEY": store.issue_key(partner.id),
        "SERVING_TARGET": f"127.0.0.1:{gateway.grpc_port}",
        "SERVING_BASE_URL": f"http://127.0.0.1:{gateway.http_port}/v1",
    }


async def _run(args: list[str], env: dict[str, str], cwd: str | None = None) -> list[str]:
    done = await asyncio.to_thread(
        subprocess.run, args, capture_output=True, text=True, timeout=300, env=env, cwd=cwd, check=False
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


async def test_qa_chat_answers_from_the_system_prompt(partner_env: dict[str, str]) -> None:
    out = await _run([sys.executable, str(EXAMPLES / "qa_chat.py")], partner_env)
    assert out[0].startswith("Q: In which city") and "Paris" in " ".join(out[1:]), out


async def test_moderation_flags_the_abusive_comment_only(partner_env: dict[str, str]) -> None:
    verdicts = [json.loads(line) for line in await _run([sys.executable, str(EXAMPLES / "moderation.py")], partner_env)]
    assert [v["flagged"] for v in verdicts] == [False, True, False], verdicts
    assert verdicts[0]["sentiment"] == "positive" and verdicts[1]["sentiment"] == "negative", verdicts


async def test_recommender_ranks_the_related_item_first(partner_env: dict[str, str]) -> None:
    out = await _run([sys.executable, str(EXAMPLES / "recommender.py")], partner_env)
    ranked = [line.split()[1] for line in out[1:]]
    assert ranked[0] == "rain-shell" and len(ranked) == 3, out


async def test_node_openai_example(partner_env: dict[str, str]) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (the example needs Node.js 18+)")
    assert (EXAMPLES / "node" / "node_modules" / "openai").is_dir(), "run `make test` (it runs npm install there)"
    out = await _run(["node", "chat.mjs"], partner_env, cwd=str(EXAMPLES / "node"))
    assert out[0].startswith("answer: ") and "Paris" in out[0], out
    usage = json.loads(out[1].removeprefix("usage: "))
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert out[2] == "embedding: 384 dimensions", out
