"""Content moderation and sentiment: zero-shot classification of user comments with the partner SDK, a comment
flagged when its abuse score passes a threshold.

    SERVING_API_KEY=$(cat var/demo-api-key) python examples/moderation.py ["a comment" ...]

``SERVING_TARGET`` defaults to 127.0.0.1:50051 (``make run``). Prints one JSON line per comment."""

from __future__ import annotations

import json
import sys

from serving_sdk import Client

ABUSE_LABELS = ["insulting and abusive", "polite and respectful"]
SENTIMENT_LABELS = ["positive", "negative"]
# The abuse score (the two labels' scores sum to 1) at which a comment is flagged for human review: above an even
# split, so that a merely blunt comment (0.38 in the README's run) stays published.
FLAG_AT = 0.6

COMMENTS = [
    "Thanks for the quick delivery, the bike rides beautifully!",
    "You are a pathetic idiot and your shop is garbage, shut up.",
    "The saddle was a bit hard at first but support helped me swap it.",
]


def moderate(client: Client, comments: list[str]) -> list[dict[str, object]]:
    abuse = client.classify(comments, ABUSE_LABELS).results  # one call classifies every comment
    sentiment = client.classify(comments, SENTIMENT_LABELS).results
    verdicts = []
    for text, a, s in zip(comments, abuse, sentiment, strict=True):
        score = dict(a.scores)[ABUSE_LABELS[0]]
        verdicts.append({"text": text, "flagged": score >= FLAG_AT, "abuse": round(score, 3), "sentiment": s.label})
    return verdicts


def main() -> None:
    with Client() as client:  # SERVING_API_KEY, SERVING_TARGET
        for verdict in moderate(client, sys.argv[1:] or COMMENTS):
            print(json.dumps(verdict))


if __name__ == "__main__":
    main()
