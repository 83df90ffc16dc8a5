"""Run by tests/test_sdk_wheel.py with the Python of a fresh venv that holds only the SDK wheel: calls the stack the
way a partner's service would, and prints what came back as JSON. Nothing here may import server code.

    python fresh_venv_calls.py calls TARGET [CA_FILE]   # embed, classify, a streamed generation
    python fresh_venv_calls.py usage TARGET [CA_FILE]   # this partner's usage rows

The key comes from SERVING_API_KEY, as a partner would configure it."""

from __future__ import annotations

import json
import sys
from typing import Any

from serving_sdk import Client, GenerateResult, TextDelta


def calls(client: Client) -> dict[str, Any]:
    embedded = client.embed(["the cat sat on the mat", "a kitten rested on the rug"])
    classified = client.classify(["I love this product, it works great"], ["positive", "negative"])
    pieces: list[str] = []
    final: GenerateResult | None = None
    for event in client.generate_stream("What is the capital of France?", max_tokens=16, temperature=0.0):
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        else:
            final = event
    assert final is not None, "the stream ended without its final message"
    return {
        "dimensions": [len(v) for v in embedded.embeddings],
        "norms": [sum(x * x for x in v) ** 0.5 for v in embedded.embeddings],
        "embed_request_id": embedded.request_id,
        "label": classified.results[0].label,
        "streamed": "".join(pieces),
        "text": final.text,
        "finish_reason": str(final.finish_reason),
        "output_tokens": final.usage.output_tokens,
    }


def usage(client: Client) -> dict[str, Any]:
    report = client.get_usage()
    return {"partner_id": report.partner_id, "requests": {row.operation: row.requests for row in report.rows}}


def main() -> None:
    mode, target = sys.argv[1], sys.argv[2]
    ca_file = sys.argv[3] if len(sys.argv) > 3 else None
    with Client(target, ca_file=ca_file) as client:
        print(json.dumps(calls(client) if mode == "calls" else usage(client)))


if __name__ == "__main__":
    main()
