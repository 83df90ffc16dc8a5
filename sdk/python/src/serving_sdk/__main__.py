"""``python -m serving_sdk`` (or ``serving-sdk``): call the partner API from a shell. The key comes from
``SERVING_API_KEY`` (or ``--api-key``), the address from ``SERVING_TARGET`` (or ``--target``)."""

from __future__ import annotations

import argparse
import sys

from serving_sdk.client import Client
from serving_sdk.errors import ApiError, ConfigurationError
from serving_sdk.types import TextDelta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serving-sdk", description="Call the partner model API over gRPC.")
    parser.add_argument("--target", help="host:port (default: $SERVING_TARGET or 127.0.0.1:50051)")
    parser.add_argument("--api-key", help="default: $SERVING_API_KEY")
    parser.add_argument("--tls", action="store_true", help="verify the gateway with the system's roots")
    parser.add_argument("--ca-file", help="verify the gateway with this CA (implies --tls)")
    sub = parser.add_subparsers(dest="op", required=True)
    sub.add_parser("models", help="list the models")
    embed = sub.add_parser("embed", help="embed texts")
    embed.add_argument("texts", nargs="+")
    classify = sub.add_parser("classify", help="score a text against labels")
    classify.add_argument("text")
    classify.add_argument("--labels", required=True, help="comma-separated")
    generate = sub.add_parser("generate", help="stream a completion")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=128)
    sub.add_parser("usage", help="this month's usage")
    args = parser.parse_args(argv)
    try:
        with Client(args.target, args.api_key, tls=args.tls or None, ca_file=args.ca_file) as client:
            if args.op == "models":
                for info in client.list_models():
                    print(f"{info.id}\t{info.task}\tready={info.ready}")
            elif args.op == "embed":
                for vector in client.embed(args.texts).embeddings:
                    print(len(vector), [round(v, 4) for v in vector[:4]])
            elif args.op == "classify":
                print(client.classify([args.text], args.labels.split(",")).results[0])
            elif args.op == "usage":
                for row in client.get_usage().rows:
                    print(row)
            else:
                for event in client.generate_stream(args.prompt, max_tokens=args.max_tokens):
                    print(event.text if isinstance(event, TextDelta) else f"\n{event.usage}", end="", flush=True)
                print()
    except (ApiError, ConfigurationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
