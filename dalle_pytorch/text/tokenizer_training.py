"""Training a text tokenizer on your own captions: `train_tokenizer` -> a Hugging Face `tokenizers` JSON file.

The tokenizer is a byte-level BPE (BPE: Sennrich et al. 2016, https://arxiv.org/abs/1508.07909; on bytes as
in GPT-2, https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf)
trained with https://huggingface.co/docs/tokenizers, with [PAD] at id 0; `HugTokenizer` loads the result.
Caption files are read exactly as the training datasets read them (`dalle_pytorch.data.text_image.captions_from_bytes`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_pytorch.text.captions import CAPTION_EXTENSION, BadSampleError, captions_from_bytes
from dalle_pytorch.text.tokenizer import HugTokenizer

__all__ = ["read_caption_folder", "train_tokenizer"]


def read_caption_folder(folder: str | os.PathLike) -> Iterator[str]:
    """Every caption line of every .txt file under `folder` (recursively, in sorted order; symlinked folders
    are not followed), read as the datasets read them: blank lines dropped, control characters removed,
    UTF-8 (or UTF-16 with a BOM) with invalid bytes replaced by U+FFFD. Files without a caption, and FIFOs or
    devices named *.txt, are skipped.
    """
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(CAPTION_EXTENSION):
                path = os.path.join(root, name)
                if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device named *.txt: hangs or never ends
                    continue
                with open(path, "rb") as file:
                    raw = file.read()
                try:
                    captions = captions_from_bytes(raw)
                except BadSampleError:  # a blank file: nothing to learn from (the datasets skip it too)
                    continue
                yield from captions


def train_tokenizer(
    captions: Iterable[str] | str | os.PathLike,
    vocab_size: int,
    out_path: str | os.PathLike,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> HugTokenizer:
    """Train a byte-level BPE tokenizer on captions, save it as JSON at `out_path`, return it loaded.

    `captions`: an iterable of caption strings, or a folder searched recursively for .txt files holding one
    caption per line. `vocab_size` counts everything: [PAD] (id 0), the 256 byte symbols and the merges.
    Byte-level BPE has no unknown token, so any language or emoji can be encoded.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size must be an int >= 258 (pad + 256 bytes + 1 merge), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive int, got {min_frequency!r}")
    if isinstance(captions, (str, os.PathLike)):
        folder = Path(captions)
        if not folder.is_dir():
            raise ValueError(f"captions: a str or path must be a folder of .txt caption files, got {folder}")
        texts: Iterable[str] = read_caption_folder(folder)
    elif isinstance(captions, Iterable):
        texts = captions
    else:
        raise TypeError(f"captions must be a folder or an iterable of str, got {type(captions).__name__}")

    counted = 0

    def checked(items: Iterable[str]) -> Iterator[str]:
        nonlocal counted
        for text in items:
            if not isinstance(text, str):
                raise TypeError(f"captions must contain str, got {type(text).__name__}")
            counted += 1
            yield text

    backend = Tokenizer(models.BPE())
    steps = [normalizers.Strip(), normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    backend.normalizer = normalizers.Sequence(steps)
    # a space is put before the first word so that "cube" is one token at the start of a caption as well
    # as after a space; decoding removes that space again
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["[PAD]"],  # first special token gets id 0: padding is reserved
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(checked(texts), trainer=trainer)
    if counted == 0:
        raise ValueError("captions: no caption found to train on")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(out))
    return HugTokenizer(out)
