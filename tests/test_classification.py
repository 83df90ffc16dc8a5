"""Zero-shot classification over the embedding model picks the right label on a labelled set."""

from __future__ import annotations

from serving_sdk import AsyncClient

LABELS = ["sports", "finance", "cooking", "weather", "technology"]
EXAMPLES = [
    ("The striker scored twice in the cup final.", "sports"),
    ("The tennis champion won in straight sets at Wimbledon.", "sports"),
    ("The basketball team signed a new point guard.", "sports"),
    ("The marathon runner broke the course record.", "sports"),
    ("The goalkeeper saved a penalty in extra time.", "sports"),
    ("The central bank raised interest rates by half a point.", "finance"),
    ("Shares of the company fell after weak quarterly earnings.", "finance"),
    ("Investors moved their savings into government bonds.", "finance"),
    ("The stock market rallied as inflation cooled.", "finance"),
    ("The bank approved a mortgage loan for the new house.", "finance"),
    ("Whisk the eggs and sugar, then fold in the flour.", "cooking"),
    ("Simmer the tomato sauce with garlic and basil for an hour.", "cooking"),
    ("Roast the chicken in the oven at 200 degrees.", "cooking"),
    ("Knead the dough and let the bread rise overnight.", "cooking"),
    ("Season the soup with salt and pepper before serving.", "cooking"),
    ("Heavy rain and thunderstorms are expected tomorrow afternoon.", "weather"),
    ("A cold front will bring snow and freezing temperatures.", "weather"),
    ("The forecast says it will be sunny and warm all week.", "weather"),
    ("Strong winds and a hurricane warning were issued for the coast.", "weather"),
    ("Fog will clear by noon, with light showers in the evening.", "weather"),
    ("The new smartphone ships with a faster processor and more memory.", "technology"),
    ("Engineers released a software update that fixes security bugs.", "technology"),
    ("The startup trains machine learning models on cloud GPUs.", "technology"),
    ("The laptop's operating system now supports faster Wi-Fi chips.", "technology"),
    ("Programmers migrated the database to a new server cluster.", "technology"),
]


async def test_zero_shot_accuracy(grpc_target: str, api_key: str) -> None:
    async with AsyncClient(grpc_target, api_key) as client:
        result = await client.classify([text for text, _ in EXAMPLES], LABELS)
    predicted = [r.label for r in result.results]
    correct = sum(p == label for p, (_, label) in zip(predicted, EXAMPLES, strict=True))
    accuracy = correct / len(EXAMPLES)
    print(f"zero-shot accuracy {correct}/{len(EXAMPLES)} = {accuracy:.2f}")
    assert accuracy >= 0.9, list(zip(predicted, EXAMPLES, strict=True))
    for r in result.results:
        assert abs(sum(score for _, score in r.scores) - 1.0) < 1e-4
        assert r.scores[0][0] == r.label and {label for label, _ in r.scores} == set(LABELS)
