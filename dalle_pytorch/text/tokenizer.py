"""Text tokenizers: captions in, DALLE token ids out.

Every tokenizer has the same interface (`BaseTokenizer`): `vocab_size`, `encode(text) -> list[int]`,
`decode(ids) -> str` and `tokenize(texts, context_length) -> LongTensor (b, context_length)`.
Id 0 is padding everywhere, because DALLE pads its text with 0; no real token is ever 0.

- `SimpleTokenizer`: OpenAI CLIP's byte-level BPE (Radford et al. 2021, https://arxiv.org/abs/2103.00020;
  BPE: Sennrich et al. 2016, https://arxiv.org/abs/1508.07909). CLIP's own ids are shifted up by one.
- `HugTokenizer`: any Hugging Face `tokenizers` JSON file (https://huggingface.co/docs/tokenizers);
  `train_tokenizer` (in `dalle_pytorch.text.tokenizer_training`) makes one from your
  own captions.
- `YttmTokenizer`: a YouTokenToMe BPE model (optional package `youtokentome`).
- `ChineseTokenizer`: BERT-style WordPiece from a local `vocab.txt` (https://arxiv.org/abs/1810.04805).

`tokenizer` is a default `SimpleTokenizer`; like every SimpleTokenizer it reads its merges file on first
use, not at import or construction.
"""

from __future__ import annotations

import gzip
import html
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from functools import cached_property
from pathlib import Path

import ftfy
import regex
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = [
    "BaseTokenizer",
    "SimpleTokenizer",
    "HugTokenizer",
    "YttmTokenizer",
    "ChineseTokenizer",
    "tokenizer",
    "PAD_ID",
]

PAD_ID = 0  # DALLE pads text with 0, so no tokenizer may give a real token this id

DEFAULT_BPE_PATH = Path(__file__).parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP's 49408 tokens = 256 byte symbols + the same with "</w>" + merges + <|startoftext|>, <|endoftext|>
CLIP_NUM_MERGES = 49408 - 256 * 2 - 2

YTTM_INSTALL_HINT = "pip install cython && pip install --no-build-isolation youtokentome"


def _as_id_list(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """Python ints from a list/tuple or a 1-D integer tensor, each checked to be in [0, vocab_size)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} of {ids.dtype}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"ids must be a list of ints or a 1-D tensor, got {type(ids).__name__}")
    out = []
    for item in ids:
        try:
            i = operator.index(item)  # accepts int and numpy integers, refuses floats
        except TypeError:
            raise TypeError(f"ids must contain ints, got {type(item).__name__}") from None
        if isinstance(item, bool):
            raise TypeError("ids must contain ints, got bool")
        if not 0 <= i < vocab_size:
            raise ValueError(f"id {i} is outside the vocabulary [0, {vocab_size})")
        out.append(i)
    return out


class BaseTokenizer(ABC):
    """Shared interface; subclasses give `vocab_size`, `encode` and `decode`, this class gives `tokenize`."""

    pad_id: int = PAD_ID

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, padding included: every id is in [0, vocab_size)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of one text, each in [1, vocab_size); no start/end tokens are added."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | torch.Tensor, pad_tokens: Collection[int] = frozenset()) -> str:
        """Text of a list or 1-D tensor of ids, dropping padding (0), special tokens and `pad_tokens`."""

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = 256, truncate_text: bool = False
    ) -> torch.Tensor:
        """Encode a text or a list of texts into a LongTensor (b, context_length), right-padded with 0.

        A text longer than `context_length` tokens raises ValueError, or is cut if `truncate_text`.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a list of str")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive int, got {context_length!r}")

        result = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)  # (b, n)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > context_length:
                if not truncate_text:
                    raise ValueError(
                        f"text {row} ({text[:40]!r}...) encodes to {len(ids)} tokens, more than "
                        f"context_length={context_length}; shorten it or pass truncate_text=True"
                    )
                ids = ids[:context_length]
            result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return result


# ---------------------------------------------------------------------------------------------------------
# CLIP byte-level BPE


def _byte_to_char() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable bytes stand for themselves; the others (control chars, space, ...) get chr(256 + k) in byte
    order, so no byte maps to whitespace and the BPE merges file stays one readable pair per line. The
    dict order is the order of CLIP's first 256 vocabulary entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + k) for k, b in enumerate(others)})
    return mapping


_BYTE_TO_CHAR = _byte_to_char()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}

# CLIP's pre-tokenizer: English contractions, runs of letters, single digits, runs of other symbols.
_CLIP_WORD_PATTERN = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
_END_OF_WORD = "</w>"


def clean_text(text: str) -> str:
    """CLIP's text cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer(BaseTokenizer):
    """OpenAI CLIP's BPE tokenizer; vocab_size 49409 = CLIP's 49408 tokens + padding.

    Ids are CLIP's ids + 1 (CLIP gives "!" id 0, which DALLE would read as padding), so
    `clip_id = id - 1`. `encode` adds no start/end tokens; `start_id` and `end_id` are there for models that
    want them, and `decode` drops them. The special strings `<|startoftext|>` in user text are plain text.
    The merges file (`bpe_path`, default: the one shipped with dalle_pytorch) is read on first use.
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None, num_merges: int = CLIP_NUM_MERGES):
        if isinstance(num_merges, bool) or not isinstance(num_merges, int) or num_merges < 0:
            raise ValueError(f"num_merges must be a non-negative int, got {num_merges!r}")
        self.bpe_path = Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        self.num_merges = num_merges
        self._word_cache: dict[str, list[int]] = {}

    @cached_property
    def _tables(self) -> tuple[dict[str, int], list[str], dict[tuple[str, str], int]]:
        """(token -> id, id -> token, merge pair -> rank), read from the merges file on first use."""
        if not self.bpe_path.is_file():
            raise FileNotFoundError(f"BPE merges file not found: {self.bpe_path}")
        with gzip.open(self.bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is a "#version" header; each following line is one merge "left right", best first
        merges = [tuple(line.split()) for line in lines[1 : 1 + self.num_merges]]
        if len(merges) < self.num_merges or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.bpe_path} does not hold {self.num_merges} merges of two symbols each")
        byte_chars = list(_BYTE_TO_CHAR.values())
        # id 0 is padding, then CLIP's vocabulary in CLIP's order
        id_to_token = ["<|pad|>", *byte_chars, *(c + _END_OF_WORD for c in byte_chars)]
        id_to_token += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        token_to_id = {t: i for i, t in enumerate(id_to_token)}
        return token_to_id, id_to_token, {m: rank for rank, m in enumerate(merges)}

    @property
    def vocab_size(self) -> int:
        return len(self._tables[1])

    @property
    def start_id(self) -> int:
        return self.vocab_size - 2

    @property
    def end_id(self) -> int:
        return self.vocab_size - 1

    def _bpe(self, word: str) -> list[str]:
        """Split one pre-token (already byte-mapped) into BPE tokens by applying merges in rank order."""
        ranks = self._tables[2]
        symbols = [*word[:-1], word[-1] + _END_OF_WORD]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        token_to_id = self._tables[0]
        byte_char = _BYTE_TO_CHAR
        ids: list[int] = []
        for word in _CLIP_WORD_PATTERN.findall(clean_text(text)):
            if word not in self._word_cache:
                if len(self._word_cache) > 100_000:  # bound memory on endless streams of new words
                    self._word_cache.clear()
                mapped = "".join(byte_char[b] for b in word.encode("utf-8"))
                self._word_cache[word] = [token_to_id[t] for t in self._bpe(mapped)]
            ids.extend(self._word_cache[word])
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, pad_tokens: Collection[int] = frozenset()) -> str:
        id_to_token = self._tables[1]
        drop = {self.pad_id, self.start_id, self.end_id, *pad_tokens}
        char_to_byte = _CHAR_TO_BYTE
        out = bytearray()
        for i in _as_id_list(ids, self.vocab_size):
            if i in drop:
                continue
            token = id_to_token[i]
            end_of_word = token.endswith(_END_OF_WORD)
            if end_of_word:
                token = token[: -len(_END_OF_WORD)]
            out.extend(char_to_byte[c] for c in token)
            if end_of_word:
                out.extend(b" ")
        # a cut sequence may end inside a multi-byte character: show U+FFFD rather than fail
        return out.decode("utf-8", errors="replace").strip()


# `from dalle_pytorch.text.tokenizer import tokenizer`: SimpleTokenizer reads its merges file on first use only
tokenizer = SimpleTokenizer()


# ---------------------------------------------------------------------------------------------------------
# Hugging Face `tokenizers`


class _LibraryTokenizer(BaseTokenizer):
    """Wraps a `tokenizers.Tokenizer`, keeping id 0 for padding.

    If the backend's id 0 is a special token other than the unknown token (a trained [PAD]), ids are used
    as they are; otherwise every id is shifted up by one so that a real token never becomes padding.
    """

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        token_zero = backend.id_to_token(0)
        special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        reserved = token_zero in special and token_zero != getattr(backend.model, "unk_token", None)
        self.id_offset = 0 if reserved else 1

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True) + self.id_offset

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [i + self.id_offset for i in ids]

    def decode(self, ids: Sequence[int] | torch.Tensor, pad_tokens: Collection[int] = frozenset()) -> str:
        drop = {self.pad_id, *pad_tokens}
        kept = [i - self.id_offset for i in _as_id_list(ids, self.vocab_size) if i not in drop]
        return self.backend.decode(kept, skip_special_tokens=True)


class HugTokenizer(_LibraryTokenizer):
    """A tokenizer saved by the Hugging Face `tokenizers` library (`tokenizer.json`), e.g. from
    `train_tokenizer`. See `_LibraryTokenizer` for how id 0 is kept for padding."""

    def __init__(self, bpe_path: str | os.PathLike):
        path = Path(bpe_path)
        if not path.is_file():
            raise FileNotFoundError(f"bpe_path: tokenizer JSON file not found: {path}")
        super().__init__(Tokenizer.from_file(str(path)))
        self.bpe_path = path


# ---------------------------------------------------------------------------------------------------------
# YouTokenToMe


class YttmTokenizer(BaseTokenizer):
    """A YouTokenToMe BPE model file (https://github.com/VKCOM/YouTokenToMe); needs `youtokentome`.

    YouTokenToMe puts <PAD> at id 0 by default; a model trained without it gets its ids shifted by one.
    """

    def __init__(self, bpe_path: str | os.PathLike):
        try:
            import youtokentome
        except ImportError as err:
            raise ImportError(f"YttmTokenizer needs the youtokentome package: {YTTM_INSTALL_HINT}") from err
        path = Path(bpe_path)
        if not path.is_file():
            raise FileNotFoundError(f"bpe_path: YouTokenToMe model file not found: {path}")
        self.bpe_path = path
        self._yttm = youtokentome
        self.backend = youtokentome.BPE(model=str(path))
        pieces = self.backend.vocab()
        self.id_offset = 0 if pieces[0] == "<PAD>" else 1
        self._special_ids = {
            i + self.id_offset for i, p in enumerate(pieces) if p in ("<PAD>", "<UNK>", "<BOS>", "<EOS>")
        }

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size() + self.id_offset

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode([text], output_type=self._yttm.OutputType.ID)[0]
        return [int(i) + self.id_offset for i in ids]

    def decode(self, ids: Sequence[int] | torch.Tensor, pad_tokens: Collection[int] = frozenset()) -> str:
        drop = {self.pad_id, *self._special_ids, *pad_tokens}
        kept = [i - self.id_offset for i in _as_id_list(ids, self.vocab_size) if i not in drop]
        return self.backend.decode([kept])[0] if kept else ""


# ---------------------------------------------------------------------------------------------------------
# Chinese WordPiece

_BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# WordPiece decoding puts a space between every Chinese character; between CJK characters it is not text
_CJK = r"[\p{Han}\p{Hiragana}\p{Katakana}\u3000-\u303f\uff00-\uffef]"
_SPACE_BETWEEN_CJK = regex.compile(rf"(?<={_CJK})\s+(?={_CJK})")


class ChineseTokenizer(_LibraryTokenizer):
    """BERT-style WordPiece for Chinese (like bert-base-chinese) from a local `vocab.txt`, one token per line.

    Each Chinese character is its own word; text is lower-cased (and accents stripped) when `lowercase`.
    The vocabulary must contain [UNK]; BERT vocabularies put [PAD] at id 0, which then stays the padding id.
    """

    def __init__(self, vocab_path: str | os.PathLike, lowercase: bool = True):
        path = Path(vocab_path)
        if not path.is_file():
            raise FileNotFoundError(f"vocab_path: WordPiece vocab file not found: {path}")
        vocab = models.WordPiece.read_file(str(path))
        if "[UNK]" not in vocab:
            raise ValueError(f"vocab_path: {path} has no [UNK] token")
        backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        backend.add_special_tokens([t for t in _BERT_SPECIAL_TOKENS if t in vocab])
        super().__init__(backend)
        self.vocab_path = path

    def decode(self, ids: Sequence[int] | torch.Tensor, pad_tokens: Collection[int] = frozenset()) -> str:
        return _SPACE_BETWEEN_CJK.sub("", super().decode(ids, pad_tokens))
