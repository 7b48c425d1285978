"""Byte-level tokenizer: UTF-8 bytes are the tokens (vocabulary 256), so nothing is downloaded."""

from __future__ import annotations

import os

import numpy as np

CORPUS_PATH = os.path.join(os.path.dirname(__file__), "data", "corpus.txt")


class ByteTokenizer:
    """Token ``i`` is the byte ``i``; ids fit any GPT-2 vocabulary of 256 or more entries."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte token ids must lie in [0, 255], got range "
                             f"[{ids.min()}, {ids.max()}]")
        # A sampled sequence may cut a multi-byte character in half.
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def load_corpus(path: str = CORPUS_PATH) -> np.ndarray:
    """The shipped training text as int32 byte ids."""
    with open(path, encoding="utf-8") as f:
        return ByteTokenizer().encode(f.read())
