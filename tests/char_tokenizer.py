"""The integration tests' offline character tokenizer is the examples' own
(``examples/tiny_model.py``): the characters of ``CHARS``, <pad> = 0 and <eos> = 1."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))

from tiny_model import CHARS, char_tokenizer  # noqa: E402

__all__ = ["CHARS", "char_tokenizer"]
