"""Compatibility: the original project's `dalle_pytorch.tokenizer` module (`from dalle_pytorch.tokenizer import
tokenizer, HugTokenizer, ...`). The tokenizers live in `dalle_pytorch.text`."""

from dalle_pytorch.text.tokenizer import *  # noqa: F403
from dalle_pytorch.text.tokenizer import __all__ as _tokenizer_names
from dalle_pytorch.text.tokenizer_training import train_tokenizer

__all__ = [*_tokenizer_names, "train_tokenizer"]
