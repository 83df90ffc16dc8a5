"""Customer-service Q&A: a streamed chat answer with a system prompt (the company's facts) and the conversation so
far, through the official ``openai`` client on the gateway's OpenAI-compatible routes.

    SERVING_API_KEY=$(cat var/demo-api-key) python examples/qa_chat.py ["your question"]

``SERVING_BASE_URL`` defaults to http://127.0.0.1:8000/v1 (``make run``)."""

from __future__ import annotations

import os
import sys

from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

MODEL = "smollm2-135m-instruct"
SYSTEM = (
    "You are the support assistant of Northwind Bikes. Facts: Northwind Bikes is headquartered in Paris, France. "
    "Support is open Monday to Friday, 9:00 to 17:00. Refunds are accepted within 30 days of delivery. "
    "Answer in one short sentence."
)
HISTORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Hi, I bought a bike from you last week."},
    {"role": "assistant", "content": "Thank you for choosing Northwind Bikes! How can I help you today?"},
]


def ask(client: OpenAI, question: str) -> str:
    """Streams the answer to stdout as it is generated and returns it whole."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        *HISTORY,
        {"role": "user", "content": question},
    ]
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True, max_tokens=48, temperature=0.0)
    answer = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            piece = chunk.choices[0].delta.content
            answer.append(piece)
            print(piece, end="", flush=True)
    print()
    return "".join(answer)


def main() -> None:
    client = OpenAI(
        base_url=os.environ.get("SERVING_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ["SERVING_API_KEY"],
    )
    question = sys.argv[1] if len(sys.argv) > 1 else "In which city is Northwind Bikes headquartered?"
    print(f"Q: {question}\nA: ", end="", flush=True)
    ask(client, question)


if __name__ == "__main__":
    main()
