"""Request bodies of realistic sizes: support tickets, reviews and news sentences (10-20 words), short
paragraphs of three to six of them (60-120 words, well under the 256-token limit), batches of one to eight
texts, label sets for zero-shot classification, and chat questions for generation."""

from __future__ import annotations

import random
from dataclasses import dataclass

from benchlib.common import SENTENCES

LABEL_SETS: tuple[tuple[str, ...], ...] = (
    ("billing", "shipping", "account access", "product defect", "cancellation"),
    ("positive", "negative", "neutral"),
    ("sports", "finance", "technology", "travel", "food", "science", "politics"),
    ("urgent", "not urgent"),
)

QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "Give me one tip for writing a clear bug report.",
    "Summarize in one sentence: the delivery arrived late and the box was damaged.",
    "Name three primary colours.",
    "How do I reset a forgotten password, briefly?",
    "Write a short, polite reply to a customer whose package is delayed.",
    "What does an API rate limit do?",
    "Translate 'good morning' into Spanish.",
)

SYSTEM_PROMPT = "You are a concise support assistant. Answer in at most two sentences."


@dataclass(frozen=True)
class Texts:
    """Draws request bodies from one seeded random generator (one per user)."""

    rng: random.Random

    def sentence(self) -> str:
        return self.rng.choice(SENTENCES)

    def paragraph(self) -> str:
        return " ".join(self.rng.sample(SENTENCES, self.rng.randint(3, 6)))

    def text(self) -> str:
        """Mostly single sentences, one in four a paragraph."""
        return self.paragraph() if self.rng.random() < 0.25 else self.sentence()

    def batch(self) -> list[str]:
        """One to eight texts; most calls carry one or two."""
        size = self.rng.choices((1, 2, 4, 8), weights=(6, 3, 2, 1))[0]
        return [self.text() for _ in range(size)]

    def labels(self) -> list[str]:
        return list(self.rng.choice(LABEL_SETS))

    def question(self) -> str:
        return self.rng.choice(QUESTIONS)
