"""Tests for dalle_pytorch.text.tokenizer, dalle_pytorch.text.tokenizer_training and the dalle-train-tokenizer CLI."""

from __future__ import annotations

import gzip
import subprocess
import sys

import pytest
import torch
import youtokentome as yttm  # an optional dependency of the package, always installed for the tests

from dalle_pytorch.cli.train_tokenizer import main as train_tokenizer_main
from dalle_pytorch.text.tokenizer import (
    DEFAULT_BPE_PATH,
    YTTM_INSTALL_HINT,
    BaseTokenizer,
    ChineseTokenizer,
    HugTokenizer,
    SimpleTokenizer,
    YttmTokenizer,
    clean_text,
    tokenizer,
)
from dalle_pytorch.text.tokenizer_training import read_caption_folder, train_tokenizer

ROUND_TRIP_TEXTS = {
    "ascii": "a small red cube on a wooden table",
    "accents": "une tasse de café crème à côté du naïf",
    "emoji": "a cat 🐱 eating pizza 🍕 with love ❤️",
    "cjk": "猫が好きです 北京欢迎你 고양이",
}

CAPTIONS = [
    "a small red cube on a wooden table",
    "a big blue sphere next to a red cube",
    "une tasse de café crème à côté du naïf",
    "a cat 🐱 eating pizza 🍕 with love ❤️",
    "猫が好きです 北京欢迎你 고양이",
] * 20


@pytest.fixture(scope="module")
def clip() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def hug(tmp_path_factory) -> HugTokenizer:
    return train_tokenizer(CAPTIONS, 400, tmp_path_factory.mktemp("hug") / "tok.json")


# ---------------------------------------------------------------- SimpleTokenizer (CLIP BPE)


def test_default_tokenizer_reads_no_file_at_import():
    code = (
        "from dalle_pytorch.text.tokenizer import tokenizer, SimpleTokenizer\n"
        "assert isinstance(tokenizer, SimpleTokenizer)\n"
        "assert '_tables' not in vars(tokenizer), 'merges file read at import'\n"
        "assert tokenizer.encode('a cat') == [321, 2369]\n"
        "assert '_tables' in vars(tokenizer)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_simple_tokenizer_reads_file_on_first_use(tmp_path):
    lazy = SimpleTokenizer(tmp_path / "missing.txt.gz")  # constructing reads nothing
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        lazy.encode("a cat")
    assert DEFAULT_BPE_PATH.is_file()
    assert tokenizer.bpe_path == DEFAULT_BPE_PATH


def test_clip_ids_shifted_by_one(clip):
    # CLIP tokenizes "a photo of a cat" as [320, 1125, 539, 320, 2368]; ours are those + 1
    assert clip.encode("a photo of a cat") == [321, 1126, 540, 321, 2369]
    assert clip.vocab_size == 49408 + 1
    assert (clip.start_id, clip.end_id) == (49407, 49408)
    # "!" (not ending a word) is CLIP's id 0, which would collide with DALLE's padding
    assert clip.encode("!~") == [1, 350]
    assert clip.decode([1, 350]) == "!~"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_clip_round_trip(clip, text):
    ids = clip.encode(text)
    assert all(0 < i < clip.vocab_size for i in ids)
    assert clip.decode(ids) == clean_text(text)
    assert clip.decode(torch.tensor(ids)) == clean_text(text)


def test_clip_round_trip_keeps_words_around_punctuation(clip):
    text = "Hello, World! It's a <b>bold</b> cat... 3.5 cm"
    decoded = clip.decode(clip.encode(text))
    assert decoded != clean_text(text)  # BPE adds spaces around punctuation
    assert decoded.replace(" ", "") == clean_text(text).replace(" ", "")


def test_clean_text():
    assert clean_text("  Fish &amp;amp;  CHIPS\n\tok ") == "fish & chips ok"
    assert clean_text("cafÃ©") == "café"  # mojibake fixed by ftfy


def test_clip_decode_drops_exactly_special_and_padding(clip):
    ids = clip.encode("a photo of a cat")
    framed = [clip.start_id, *ids, clip.end_id, 0, 0]
    assert clip.decode(framed) == "a photo of a cat"
    assert clip.decode(framed, pad_tokens={ids[1]}) == "a of a cat"
    assert clip.decode([1, 0, 1]) == "!!"  # token 1 is a real token, only 0 is padding


def test_clip_decode_rejects_bad_ids(clip):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        clip.decode([clip.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        clip.decode([-1])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        clip.decode(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        clip.decode(torch.ones(3))
    with pytest.raises(TypeError, match="ids must"):
        clip.decode("321")
    with pytest.raises(TypeError, match="text must be a str"):
        clip.encode(b"bytes")


def _write_merges(path, merges):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_bpe_applies_merges_in_rank_order(tmp_path):
    path = tmp_path / "merges.txt.gz"
    # "l o</w>" outranks "l l": merging "l l" first would strand "he ll o</w>" with no further merge
    _write_merges(path, ["h e", "l o</w>", "l l", "he l", "hel lo</w>"])
    tok = SimpleTokenizer(path, num_merges=5)
    assert tok.vocab_size == 1 + 512 + 5 + 2
    hello_id = 1 + 512 + 4  # padding, 512 byte symbols, then the 5th merge
    assert tok.encode("hello") == [hello_id]
    assert tok.encode("hello hello") == [hello_id, hello_id]
    assert tok.decode([hello_id, hello_id]) == "hello hello"
    # unmerged words fall back to byte symbols ending in "</w>"
    assert len(tok.encode("hole")) == 4
    assert tok.decode(tok.encode("hole")) == "hole"


def test_bpe_file_with_too_few_merges(tmp_path):
    path = tmp_path / "short.txt.gz"
    _write_merges(path, ["h e"])
    with pytest.raises(ValueError, match="does not hold 5 merges"):
        SimpleTokenizer(path, num_merges=5).encode("he")
    with pytest.raises(ValueError, match="num_merges"):
        SimpleTokenizer(path, num_merges=-1)


# ---------------------------------------------------------------- tokenize (shared base class)


def test_tokenize_pads_with_zero(clip):
    texts = ["a cat", "a photo of a cat"]
    out = clip.tokenize(texts, context_length=8)
    assert out.shape == (2, 8) and out.dtype == torch.long
    expected = torch.zeros(2, 8, dtype=torch.long)
    expected[0, :2] = torch.tensor(clip.encode(texts[0]))
    expected[1, :5] = torch.tensor(clip.encode(texts[1]))
    assert torch.equal(out, expected)
    assert torch.equal(clip.tokenize("a cat", 8), expected[:1])
    assert clip.decode(out[1]) == "a photo of a cat"
    assert clip.tokenize([], 4).shape == (0, 4)


def test_tokenize_too_long(clip):
    with pytest.raises(ValueError, match="encodes to 5 tokens, more than context_length=3.*truncate_text"):
        clip.tokenize(["a cat", "a photo of a cat"], context_length=3)
    out = clip.tokenize(["a photo of a cat"], context_length=3, truncate_text=True)
    assert torch.equal(out[0], torch.tensor(clip.encode("a photo of a cat")[:3]))
    assert torch.equal(clip.tokenize("a cat", context_length=2)[0], torch.tensor(clip.encode("a cat")))


def test_tokenize_bad_arguments(clip):
    with pytest.raises(TypeError, match="texts must be"):
        clip.tokenize(["a cat", 3])
    with pytest.raises(TypeError, match="texts must be"):
        clip.tokenize(None)
    with pytest.raises(ValueError, match="context_length"):
        clip.tokenize("a cat", context_length=0)
    with pytest.raises(ValueError, match="context_length"):
        clip.tokenize("a cat", context_length=2.5)


# ---------------------------------------------------------------- HugTokenizer and training


def test_trained_tokenizer_reserves_padding(hug):
    assert isinstance(hug, BaseTokenizer)
    assert hug.backend.id_to_token(0) == "[PAD]" and hug.id_offset == 0
    assert hug.vocab_size == hug.backend.get_vocab_size()
    assert 258 <= hug.vocab_size <= 400
    for text in CAPTIONS[:5]:
        assert 0 not in hug.encode(text)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_hug_round_trip(hug, text):
    ids = hug.encode(text)
    assert all(isinstance(i, int) and 0 < i < hug.vocab_size for i in ids)
    assert hug.decode(ids) == text.lower()
    assert hug.decode(hug.tokenize(text, context_length=len(ids) + 3)[0]) == text.lower()


def test_hug_learns_frequent_words_and_unseen_bytes(hug):
    assert len(hug.encode("cube")) == 1  # seen 40 times: one token, at the start as after a space
    assert hug.encode("a cube")[1:] == hug.encode("cube")
    assert hug.decode(hug.encode("Zebra ß 🦓")) == "zebra ß 🦓"  # never seen: byte fallback, no [UNK]


def test_hug_decode_pad_tokens(hug):
    ids = hug.encode("a red cube")
    assert hug.decode([*ids, 0, 0]) == "a red cube"
    assert hug.decode(ids, pad_tokens={ids[-1]}) == hug.decode(ids[:-1])


def test_train_tokenizer_from_folder(tmp_path):
    nested = tmp_path / "captions" / "a" / "b"
    nested.mkdir(parents=True)
    (tmp_path / "captions" / "one.txt").write_text("a zebra on grass\n\n" * 30, encoding="utf-8")
    (nested / "two.TXT").write_text("zebra crossing\n" * 30, encoding="utf-8")
    (nested / "bad.txt").write_bytes(b"\xff\xfe broken bytes\n")
    (nested / "other.csv").write_text("giraffe giraffe\n" * 100, encoding="utf-8")
    tok = train_tokenizer(tmp_path / "captions", 300, tmp_path / "out" / "tok.json")
    assert (tmp_path / "out" / "tok.json").is_file()
    assert len(tok.encode("zebra")) == 1  # learned from the nested .txt files
    assert len(tok.encode("giraffe")) > 1  # .csv files are not captions
    assert isinstance(HugTokenizer(tmp_path / "out" / "tok.json").encode("zebra")[0], int)


def test_caption_folder_is_read_like_the_datasets_read_it(tmp_path):
    folder = tmp_path / "captions"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbf  first caption  \r\n\n \t \nsecond\x00 caption\n")  # UTF-8 BOM
    (folder / "b" / "broken.txt").write_bytes(b"zebra \xff stripes\n\xfe\xfe\n")  # invalid UTF-8
    (folder / "b" / "blank.txt").write_bytes(b"\n  \n")  # no caption: skipped, not an error
    (folder / "b" / "wide.TXT").write_bytes("\ufeffgiraffe\n".encode("utf-16-le"))
    (folder / "notes.md").write_text("not a caption\n")
    assert list(read_caption_folder(folder)) == [
        "first caption",
        "second caption",
        "zebra \ufffd stripes",  # the line of only invalid bytes is dropped
        "giraffe",
    ]


def test_train_tokenizer_stays_importable_from_the_tokenizer_module():
    import dalle_pytorch.text.tokenizer_training as training_module
    import dalle_pytorch.tokenizer as tokenizer_module
    from dalle_pytorch.tokenizer import train_tokenizer as old_path

    assert old_path is training_module.train_tokenizer is train_tokenizer
    assert "train_tokenizer" in tokenizer_module.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        tokenizer_module.no_such_name  # noqa: B018


def test_tokenizers_import_without_the_training_module_or_datasets():
    code = (
        "import sys\n"
        "import dalle_pytorch.text.tokenizer\n"
        "assert 'dalle_pytorch.text.tokenizer_training' not in sys.modules\n"
        "assert 'dalle_pytorch.data.text_image' not in sys.modules\n"
        "import dalle_pytorch.text.tokenizer_training\n"  # trains from caption files without importing the datasets
        "assert 'dalle_pytorch.data.text_image' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_train_tokenizer_bad_input(tmp_path):
    out = tmp_path / "tok.json"
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, 100, out)
    with pytest.raises(ValueError, match="folder"):
        train_tokenizer("a single caption, not a folder", 300, out)
    with pytest.raises(ValueError, match="no caption"):
        train_tokenizer([], 300, out)
    with pytest.raises(ValueError, match="no caption"):
        train_tokenizer(tmp_path, 300, out)  # a folder without .txt files
    with pytest.raises(TypeError, match="must contain str"):
        train_tokenizer(["ok", 3], 300, out)
    with pytest.raises(TypeError, match="captions must be"):
        train_tokenizer(42, 300, out)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(CAPTIONS, 300, out, min_frequency=0)
    assert not out.exists()


def test_train_tokenizer_cli(tmp_path, capsys):
    folder = tmp_path / "caps"
    folder.mkdir()
    (folder / "c.txt").write_text("\n".join(CAPTIONS), encoding="utf-8")
    train_tokenizer_main(["--captions", str(folder), "--vocab-size", "300", "--out", f"{tmp_path}/a.json"])
    assert "vocab_size" in capsys.readouterr().out
    # underscore spellings are accepted too
    train_tokenizer_main(
        ["--captions", str(folder), "--vocab_size", "300", "--out", f"{tmp_path}/b.json", "--no_lowercase"]
    )
    lower, cased = HugTokenizer(tmp_path / "a.json"), HugTokenizer(tmp_path / "b.json")
    assert lower.decode(lower.encode("Red Cube")) == "red cube"
    assert cased.decode(cased.encode("Red Cube")) == "Red Cube"
    with pytest.raises(SystemExit) as exit_info:
        train_tokenizer_main(["--captions", str(tmp_path / "nope"), "--vocab-size", "300", "--out", "x.json"])
    assert exit_info.value.code == 2
    assert "folder" in capsys.readouterr().err


def test_hug_file_without_pad_is_shifted(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1, "cube": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "wordlevel.json"))
    tok = HugTokenizer(tmp_path / "wordlevel.json")
    assert tok.id_offset == 1 and tok.vocab_size == 4
    assert tok.encode("red cube blue") == [2, 3, 1]  # unknown word is 1, not padding
    assert tok.decode([2, 3, 0, 0]) == "red cube"
    with pytest.raises(FileNotFoundError, match="bpe_path"):
        HugTokenizer(tmp_path / "missing.json")


# ---------------------------------------------------------------- YttmTokenizer (optional)


def test_yttm_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "youtokentome", None)  # makes `import youtokentome` fail
    with pytest.raises(ImportError, match="pip install cython && pip install --no-build-isolation"):
        YttmTokenizer(tmp_path / "model.yttm")
    assert "youtokentome" in YTTM_INSTALL_HINT


@pytest.fixture(scope="module")
def yttm_tokenizer(tmp_path_factory) -> YttmTokenizer:
    folder = tmp_path_factory.mktemp("yttm")
    (folder / "captions.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    yttm.BPE.train(data=str(folder / "captions.txt"), model=str(folder / "model.yttm"), vocab_size=200)
    return YttmTokenizer(folder / "model.yttm")


@pytest.mark.parametrize("text", ["a small red cube", "une tasse de café", "北京欢迎你", "a cat 🐱"])
def test_yttm_round_trip(yttm_tokenizer, text):
    tok = yttm_tokenizer
    assert tok.id_offset == 0 and tok.vocab_size <= 200
    ids = tok.encode(text)
    assert isinstance(ids, list) and all(type(i) is int and 0 < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.tokenize([text, "a"], context_length=len(ids) + 2)[0]) == text


def test_yttm_decode_drops_special_tokens(yttm_tokenizer):
    tok = yttm_tokenizer
    ids = tok.encode("a red cube")
    bos, eos = tok.backend.subword_to_id("<BOS>"), tok.backend.subword_to_id("<EOS>")
    assert tok.decode([bos, *ids, eos, 0, 0]) == "a red cube"
    with pytest.raises(FileNotFoundError, match="bpe_path"):
        YttmTokenizer("missing.model")


# ---------------------------------------------------------------- ChineseTokenizer

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"我爱北京天安门，。", "red", "cu", "##be", "a"]


def _write_vocab(path, tokens):
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def test_chinese_tokenizer(tmp_path):
    tok = ChineseTokenizer(_write_vocab(tmp_path / "vocab.txt", BERT_VOCAB))
    assert tok.vocab_size == len(BERT_VOCAB) and tok.id_offset == 0
    assert tok.encode("我爱北京天安门") == [5, 6, 7, 8, 9, 10, 11]  # one token per character, no [CLS]/[SEP]
    assert tok.encode("A Red CUBE") == [17, 14, 15, 16]  # lower-cased, WordPiece continuation "##be"
    assert tok.decode(tok.encode("我爱北京，天安门。")) == "我爱北京，天安门。"
    assert tok.decode(tok.encode("a red cube 北京")) == "a red cube 北京"
    assert tok.encode("我爱猫") == [5, 6, 1]  # unknown character -> [UNK], which decode drops
    assert tok.decode([2, 5, 6, 3, 0, 0]) == "我爱"  # [CLS], [SEP] and padding dropped
    out = tok.tokenize(["我爱北京", "天安门"], context_length=5)
    assert torch.equal(out, torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]]))


def test_chinese_tokenizer_vocab_checks(tmp_path):
    no_pad = ChineseTokenizer(_write_vocab(tmp_path / "no_pad.txt", ["我", "[UNK]", "爱"]))
    assert no_pad.id_offset == 1 and no_pad.vocab_size == 4
    assert no_pad.encode("我爱") == [1, 3]  # "我" is a real token: shifted off the padding id
    assert no_pad.decode([1, 3, 0]) == "我爱"
    with pytest.raises(ValueError, match=r"no \[UNK\]"):
        ChineseTokenizer(_write_vocab(tmp_path / "no_unk.txt", ["[PAD]", "我"]))
    with pytest.raises(FileNotFoundError, match="vocab_path"):
        ChineseTokenizer(tmp_path / "missing.txt")
