"""Tokenizers: ByteTokenizer by default (ids 0-255 are bytes, then BOS and EOS); a model directory's
tokenizer.json through the `tokenizers` package when one is given."""
from __future__ import annotations

import os

from kvxfer.errors import InvalidArgument


class ByteTokenizer:
    bos_id, eos_id = 256, 257
    vocab_size = 258

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise InvalidArgument("a model directory's tokenizer needs the `tokenizers` package: "
                                  "pip install tokenizers") from None
        self._tok = Tokenizer.from_file(path)
        self.bos_id = self._tok.token_to_id("<s>") or self._tok.token_to_id("<|begin_of_text|>")
        self.eos_id = self._tok.token_to_id("</s>") or self._tok.token_to_id("<|end_of_text|>")
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(model_dir: str | None):
    if model_dir and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return HFTokenizer(os.path.join(model_dir, "tokenizer.json"))
    return ByteTokenizer()
