"""Recommendation: embed a small catalogue once, then rank it by cosine similarity to a shopper's query, with the
partner SDK. The embeddings are unit vectors, so the similarity is a dot product.

    SERVING_API_KEY=$(cat var/demo-api-key) python examples/recommender.py ["what the shopper typed"]

``SERVING_TARGET`` defaults to 127.0.0.1:50051 (``make run``). Prints the top three with their scores."""

from __future__ import annotations

import sys

from serving_sdk import Client

CATALOGUE = {
    "rain-shell": "Lightweight waterproof rain jacket for hiking and cycling in wet weather",
    "wool-socks": "Merino wool socks that keep feet warm on winter walks",
    "bike-light": "Rechargeable LED front light for riding a bicycle at night",
    "tent-2p": "Two-person camping tent, quick to pitch, for backpacking trips",
    "espresso": "Stovetop espresso maker for strong coffee at the campsite",
    "yoga-mat": "Non-slip yoga mat for stretching and home workouts",
    "helmet": "Ventilated cycling helmet with adjustable fit",
    "sunglasses": "Polarised sunglasses that cut glare on the water",
}


def recommend(client: Client, query: str, top: int = 3) -> list[tuple[str, float]]:
    ids = list(CATALOGUE)
    items = client.embed([CATALOGUE[i] for i in ids]).embeddings  # in a real service: computed once and stored
    (wanted,) = client.embed([query]).embeddings
    scores = {i: sum(a * b for a, b in zip(vector, wanted, strict=True)) for i, vector in zip(ids, items, strict=True)}
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)[:top]


def main() -> None:
    query = sys.argv[1] if len(sys.argv) > 1 else "something to keep me dry when it pours on a mountain trail"
    with Client() as client:  # SERVING_API_KEY, SERVING_TARGET
        print(f"query: {query}")
        for item, score in recommend(client, query):
            print(f"{score:.3f}  {item}  {CATALOGUE[item]}")


if __name__ == "__main__":
    main()
