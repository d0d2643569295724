"""Tests for the folder dataset (dalle_pytorch.data.text_image) and the WebDataset pipeline (data.webdata)."""

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dalle_pytorch.data.text_image import (
    BadSampleError,
    TextImageDataset,
    captions_from_bytes,
    preprocess_image,
    random_square_box,
)

TEXT_LEN = 24
SIZE = 8


class ByteTokenizer:
    """Stand-in tokenizer: UTF-8 bytes as ids, zero-padded, so captions can be read back from tokens."""

    def tokenize(self, texts, context_length=256, truncate_text=False):
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = list(text.encode("utf-8"))
            if len(ids) > context_length:
                if not truncate_text:
                    raise ValueError(f"text too long for context length {context_length}")
                ids = ids[:context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def caption_of(tokens: torch.Tensor) -> str:
    return bytes(t for t in tokens.tolist() if t).decode("utf-8")


def image_bytes(mode="RGB", size=(20, 12), color=(200, 30, 30), fmt="PNG", noise=False) -> bytes:
    buffer = io.BytesIO()
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new(mode, size, color)
    if mode == "P":
        image.putpalette([0, 0, 255] * 256)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


GOOD_CAPTIONS = {
    "red.png": ["a red square", "another red caption"],
    "a/cat.png": ["cat in a"],
    "b/cat.png": ["cat in b"],
    "upper/DOG.PNG": ["an uppercase png"],
    "upper/bird.JPG": ["an uppercase jpg"],
    "rgba.png": ["transparent black"],
    "palette.png": ["a palette image"],
    "gray.jpeg": ["a grayscale jpeg"],
    "la.png": ["gray with alpha"],
    "pic.webp": ["a webp"],
    "pic2.bmp": ["a bitmap"],
    "cafe.png": ["caf\ufffd au lait"],
}


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write(root / "red.png", image_bytes())
    write(root / "red.txt", "a red square\n\n   \nanother red caption\n")
    write(root / "a/cat.png", image_bytes(color=(0, 0, 0)))
    write(root / "a/cat.txt", "cat in a")
    write(root / "b/cat.png", image_bytes(color=(255, 255, 255)))
    write(root / "b/cat.txt", "cat in b\n")
    write(root / "upper/DOG.PNG", image_bytes())
    write(root / "upper/DOG.txt", "an uppercase png")
    write(root / "upper/bird.JPG", image_bytes(fmt="JPEG"))
    write(root / "upper/bird.TXT", "an uppercase jpg")
    write(root / "rgba.png", image_bytes("RGBA", color=(0, 0, 0, 0)))
    write(root / "rgba.txt", "transparent black")
    write(root / "palette.png", image_bytes("P", color=3))
    write(root / "palette.txt", "a palette image")
    write(root / "gray.jpeg", image_bytes("L", color=90, fmt="JPEG"))
    write(root / "gray.txt", "a grayscale jpeg")
    write(root / "la.png", image_bytes("LA", color=(0, 0)))
    write(root / "la.txt", "gray with alpha")
    write(root / "pic.webp", image_bytes(fmt="WEBP"))
    write(root / "pic.txt", "a webp")
    write(root / "pic2.bmp", image_bytes(fmt="BMP"))
    write(root / "pic2.txt", "a bitmap")
    write(root / "cafe.png", image_bytes())
    write(root / "cafe.txt", b"caf\xe9 au lait\n")
    # broken samples
    write(root / "corrupt.jpg", b"\xff\xd8\xff this is not really a jpeg")
    write(root / "corrupt.txt", "a corrupt image")
    truncated = image_bytes(size=(64, 64), noise=True)
    write(root / "truncated.png", truncated[: len(truncated) // 2])
    write(root / "truncated.txt", "a truncated image")
    write(root / "blank.png", image_bytes())
    write(root / "blank.txt", "\n   \n\t\n")
    write(root / "gone.png", image_bytes())
    write(root / "gone.txt", "deleted after indexing")
    # unpaired and ignored files
    write(root / "lonely.png", image_bytes())
    write(root / "ghost.txt", "a caption without image")
    write(root / "notes.md", "not a sample")
    write(root / ".hidden.png", b"resource fork junk")
    write(root / ".hidden.txt", "ignored")
    return root


def make_dataset(folder, **kwargs) -> TextImageDataset:
    kwargs = {"text_len": TEXT_LEN, "image_size": SIZE, "tokenizer": ByteTokenizer(), **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TextImageDataset(folder, **kwargs)


def sample_names(dataset: TextImageDataset) -> list[str]:
    return [image.relative_to(dataset.folder).as_posix() for image, _ in dataset.pairs]


# ----------------------------------------------------------------------------------------- folder dataset


def test_index_pairs_by_path_and_reports_orphans_once(messy_folder):
    with pytest.warns(RuntimeWarning, match="1 image.* without a caption.* 1 caption") as record:
        dataset = TextImageDataset(messy_folder, text_len=TEXT_LEN, image_size=SIZE, tokenizer=ByteTokenizer())
    assert len([w for w in record if "without a caption" in str(w.message)]) == 1
    assert dataset.images_without_caption == 1
    assert dataset.captions_without_image == 1
    names = sample_names(dataset)
    expected = set(GOOD_CAPTIONS) | {"corrupt.jpg", "truncated.png", "blank.png", "gone.png"}
    assert set(names) == expected and len(names) == len(expected) == len(dataset)
    assert "a/cat.png" in names and "b/cat.png" in names


def test_every_item_is_valid_and_bad_files_are_counted_once(messy_folder):
    dataset = make_dataset(messy_folder)
    (messy_folder / "gone.png").unlink()
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="skipping") as record:
        items = [dataset[i] for i in range(len(dataset))]
    assert len([w for w in record if "skipping" in str(w.message)]) == 4
    assert dataset.skipped == {"corrupt image": 2, "empty caption": 1, "missing file": 1}
    all_captions = {c for captions in GOOD_CAPTIONS.values() for c in captions}
    for tokens, image in items:
        assert tokens.dtype == torch.long and tokens.shape == (TEXT_LEN,)
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        assert image.min() >= 0 and image.max() <= 1
        assert caption_of(tokens) in all_captions
    # a second epoch neither warns again nor counts twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(len(dataset)):
            dataset[i]
    assert dataset.skipped.total() == 4


def test_bad_sample_is_replaced_by_the_next_readable_one(messy_folder):
    dataset = make_dataset(messy_folder)
    names = sample_names(dataset)
    bad = names.index("corrupt.jpg")
    following = names[(bad + 1) % len(names)]
    with pytest.warns(RuntimeWarning, match="corrupt.jpg"):
        tokens, _ = dataset[bad]
    if following in GOOD_CAPTIONS:
        assert caption_of(tokens) in GOOD_CAPTIONS[following]
    tokens_again, _ = dataset[bad]
    assert caption_of(tokens_again) == caption_of(tokens)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_each_sample_keeps_its_own_caption(messy_folder):
    dataset = make_dataset(messy_folder)
    names = sample_names(dataset)
    for name in ["a/cat.png", "b/cat.png", "upper/DOG.PNG", "upper/bird.JPG", "cafe.png", "pic.webp"]:
        tokens, _ = dataset[names.index(name)]
        assert caption_of(tokens) in GOOD_CAPTIONS[name]


def test_captions_are_picked_at_random_among_lines(messy_folder):
    dataset = make_dataset(messy_folder)
    index = sample_names(dataset).index("red.png")
    torch.manual_seed(1)
    seen = {caption_of(dataset[index][0]) for _ in range(40)}
    assert seen == set(GOOD_CAPTIONS["red.png"])


def test_transparency_and_modes(messy_folder):
    opaque = make_dataset(messy_folder)
    transparent = make_dataset(messy_folder, transparent=True)
    names = sample_names(opaque)
    rgba = names.index("rgba.png")
    # fully transparent black composited on white is white
    torch.testing.assert_close(opaque[rgba][1], torch.ones(3, SIZE, SIZE))
    four = transparent[rgba][1]
    assert four.shape == (4, SIZE, SIZE)
    torch.testing.assert_close(four[3], torch.zeros(SIZE, SIZE))
    torch.testing.assert_close(opaque[names.index("la.png")][1], torch.ones(3, SIZE, SIZE))
    # opaque images get an opaque alpha channel
    red_rgba = transparent[names.index("red.png")][1]
    torch.testing.assert_close(red_rgba[3], torch.ones(SIZE, SIZE))
    # palette colour 3 is blue; grayscale becomes three equal channels
    palette = opaque[names.index("palette.png")][1]
    torch.testing.assert_close(palette, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, SIZE, SIZE))
    gray = opaque[names.index("gray.jpeg")][1]
    torch.testing.assert_close(gray[0], gray[1])
    torch.testing.assert_close(gray[0], gray[2])
    torch.testing.assert_close(gray.mean(), torch.tensor(90 / 255), atol=0.02, rtol=0)


def test_same_seed_same_samples_and_dataloader_with_seeded_generator(messy_folder):
    dataset = make_dataset(messy_folder, resize_ratio=0.3)

    def epoch(seed):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [dataset[i] for i in range(len(dataset))]

    first, second, other = epoch(3), epoch(3), epoch(4)
    for (t1, i1), (t2, i2) in zip(first, second):
        assert torch.equal(t1, t2)
        torch.testing.assert_close(i1, i2)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other))

    def loader_run():
        generator = torch.Generator().manual_seed(7)
        loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2, generator=generator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(loader)

    for (t1, i1), (t2, i2) in zip(loader_run(), loader_run()):
        assert torch.equal(t1, t2)
        torch.testing.assert_close(i1, i2)


def test_shuffle_is_a_seeded_permutation(messy_folder):
    plain = make_dataset(messy_folder)
    torch.manual_seed(0)
    shuffled = make_dataset(messy_folder, shuffle=True)
    torch.manual_seed(0)
    again = make_dataset(messy_folder, shuffle=True)
    assert sorted(sample_names(shuffled)) == sorted(sample_names(plain))
    assert sample_names(shuffled) != sample_names(plain)
    assert sample_names(shuffled) == sample_names(again)


def test_verify_counts_up_front_and_keeps_rng(messy_folder):
    dataset = make_dataset(messy_folder)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = dataset.verify()
    assert counts == {"corrupt image": 2, "empty caption": 1}
    assert torch.equal(torch.get_rng_state(), state)


def test_all_bad_samples_is_a_clear_error(tmp_path):
    write(tmp_path / "x.png", b"garbage")
    write(tmp_path / "x.txt", "caption")
    write(tmp_path / "y.png", image_bytes())
    write(tmp_path / "y.txt", "\n")
    dataset = make_dataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no readable sample.*all 2"):
            dataset[0]


def test_empty_or_invalid_folder_and_arguments(tmp_path, messy_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image with a same-named .txt"):
        TextImageDataset(tmp_path / "empty", tokenizer=ByteTokenizer())
    write(tmp_path / "orphans/a.png", image_bytes())
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no image"):
        TextImageDataset(tmp_path / "orphans", tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="folder"):
        TextImageDataset(tmp_path / "missing")
    with pytest.raises(TypeError, match="folder"):
        TextImageDataset(42)
    for bad in [{"image_size": 0}, {"text_len": -1}, {"resize_ratio": 0.0}, {"resize_ratio": 1.5}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_dataset(messy_folder, **bad)
    with pytest.raises(TypeError, match="tokenizer"):
        make_dataset(messy_folder, tokenizer=object())


def test_long_captions_need_truncate(tmp_path):
    write(tmp_path / "x.png", image_bytes())
    write(tmp_path / "x.txt", "a" * (TEXT_LEN + 5))
    with pytest.raises(ValueError, match="x.txt.*too long"):
        make_dataset(tmp_path)[0]
    tokens, _ = make_dataset(tmp_path, truncate_captions=True)[0]
    assert caption_of(tokens) == "a" * TEXT_LEN


def test_captions_from_bytes():
    assert captions_from_bytes(b"\xef\xbb\xbfone\r\ntwo\n\n") == ["one", "two"]
    assert captions_from_bytes("caf\u00e9 \U0001f600 \u732b".encode()) == ["caf\u00e9 \U0001f600 \u732b"]
    assert captions_from_bytes("utf sixteen".encode("utf-16")) == ["utf sixteen"]
    assert captions_from_bytes(b"bad \xff byte") == ["bad \ufffd byte"]
    assert captions_from_bytes(b"nul\x00s removed") == ["nuls removed"]
    for empty in [b"", b"\n \n", b"\xff\xfe\xff"[2:], b"\xff\n\xfe"]:
        with pytest.raises(BadSampleError) as caught:
            captions_from_bytes(empty)
        assert caught.value.reason == "empty caption" and isinstance(caught.value, ValueError)


def test_random_square_box_covers_the_requested_area():
    torch.manual_seed(0)
    for width, height in [(40, 40), (64, 16), (10, 30)]:
        for _ in range(50):
            left, top, right, bottom = random_square_box(width, height, 0.5)
            side = right - left
            assert side == pytest.approx(bottom - top)
            assert left >= 0 and top >= 0 and right <= width + 1e-9 and bottom <= height + 1e-9
            fraction = side * side / (width * height)
            assert 0.5 - 1e-9 <= fraction <= 1 + 1e-9 or side == pytest.approx(min(width, height))


def test_full_crop_of_a_square_image_is_a_plain_resize():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    out = preprocess_image(image, SIZE, resize_ratio=1.0)
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1))


# ------------------------------------------------------------------------------------------- webdataset


def write_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    root.mkdir()
    for shard in range(3):
        members = {}
        for i in range(4):
            key = f"s{shard}_{i}"
            fmt = "PNG" if i % 2 else "JPEG"
            extension = "png" if fmt == "PNG" else "jpg"
            members[f"{key}.{extension}"] = image_bytes(color=(i * 60, 0, 0), fmt=fmt)
            members[f"{key}.txt"] = f"caption {key}".encode()
        write_shard(root / f"shard-{shard:03d}.tar", members)
    write_shard(
        root / "shard-003.tar",
        {
            "bad.jpg": b"not an image",
            "bad.txt": b"corrupt",
            "nocap.png": image_bytes(),
            "empty.png": image_bytes(),
            "empty.txt": b"\n\n",
            "good.png": image_bytes(),
            "good.txt": b"caption good",
        },
    )
    (root / "shard-004.tar").write_bytes(b"this is not a tar file at all" * 40)
    return root


GOOD_WEB = {f"caption s{s}_{i}" for s in range(3) for i in range(4)} | {"caption good"}


def web_dataset(urls, **kwargs):
    from dalle_pytorch.data.webdata import TextImageWebDataset

    kwargs = {"text_len": TEXT_LEN, "image_size": SIZE, "tokenizer": ByteTokenizer(), **kwargs}
    return TextImageWebDataset(urls, **kwargs)


def read_all(dataset) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(dataset)


def test_webdataset_reads_good_samples_and_counts_bad_ones(shards):
    dataset = web_dataset(shards, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning, match="skipping"):
        items = list(dataset)
    assert sorted(caption_of(tokens) for tokens, _ in items) == sorted(GOOD_WEB)
    for tokens, image in items:
        assert tokens.shape == (TEXT_LEN,) and tokens.dtype == torch.long
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
    assert dataset.skipped == {
        "corrupt image": 1,
        "missing caption": 1,
        "empty caption": 1,
        "unreadable shard": 1,
    }


def test_webdataset_truncated_shard_keeps_its_complete_samples(tmp_path):
    members = {}
    for i in range(6):
        members[f"{i}.png"] = image_bytes(size=(32, 32), noise=True)
        members[f"{i}.txt"] = f"caption {i}".encode()
    write_shard(tmp_path / "a.tar", members)
    whole = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(whole[: len(whole) // 2 + 700])  # cut inside a member's data
    write_shard(tmp_path / "b.tar", {"last.png": image_bytes(), "last.txt": b"caption last"})
    dataset = web_dataset([tmp_path / "a.tar", tmp_path / "b.tar"], shuffle_buffer=0, shuffle_shards=False)
    captions = [caption_of(tokens) for tokens, _ in read_all(dataset)]
    assert captions[-1] == "caption last"
    assert 1 <= len(captions) - 1 < 6
    assert captions[:-1] == [f"caption {i}" for i in range(len(captions) - 1)]
    assert dataset.skipped["unreadable shard"] == 1


def test_webdataset_shard_specs(shards):
    from dalle_pytorch.data.webdata import expand_shards

    listed = expand_shards(shards)
    assert [p.name for p in listed] == [f"shard-{i:03d}.tar" for i in range(5)]
    assert expand_shards(str(shards / "shard-{000..004}.tar")) == listed
    assert expand_shards([str(p) for p in listed[:2]] + [listed[2]]) == listed[:3]
    assert expand_shards("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    with pytest.raises(ValueError, match="scheme"):
        expand_shards("s3://bucket/shard.tar")
    with pytest.raises(ValueError, match="not found"):
        expand_shards(str(shards / "shard-{000..009}.tar"))
    (shards.parent / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar"):
        expand_shards(shards.parent / "empty")
    with pytest.raises(ValueError, match="empty"):
        expand_shards([])
    with pytest.raises(TypeError, match="urls"):
        expand_shards(3)


def test_webdataset_file_names_never_reach_a_shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "odd"
    folder.mkdir()
    write_shard(folder / "pipe:touch HACKED #.tar", {"k.png": image_bytes(), "k.txt": b"caption odd"})
    items = read_all(web_dataset(folder, shuffle_buffer=0))
    assert [caption_of(tokens) for tokens, _ in items] == ["caption odd"]
    assert not (tmp_path / "HACKED").exists()
    # an explicit pipe: URL written by the user is run
    items = read_all(web_dataset(f"pipe:cat '{folder}/pipe:touch HACKED #.tar'", shuffle_buffer=0))
    assert [caption_of(tokens) for tokens, _ in items] == ["caption odd"]


def test_webdataset_splits_across_ranks_and_shuffles_by_epoch(shards):
    parts = []
    for rank in range(2):
        parts.append([caption_of(t) for t, _ in read_all(web_dataset(shards, rank=rank, world_size=2))])
    assert parts[0] and parts[1]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(GOOD_WEB)

    dataset = web_dataset(shards, shuffle_buffer=8, seed=1)
    torch.manual_seed(0)
    epoch0 = [caption_of(t) for t, _ in read_all(dataset)]
    torch.manual_seed(0)
    epoch0_again = [caption_of(t) for t, _ in read_all(dataset)]
    dataset.set_epoch(1)
    epoch1 = [caption_of(t) for t, _ in read_all(dataset)]
    assert epoch0 == epoch0_again
    assert sorted(epoch0) == sorted(epoch1) == sorted(GOOD_WEB)
    assert epoch0 != epoch1


def test_webdataset_loader_with_workers_is_reproducible(shards):
    from dalle_pytorch.data.webdata import webdataset_loader

    def run():
        loader = webdataset_loader(
            shards,
            batch_size=3,
            num_workers=2,
            generator=torch.Generator().manual_seed(0),
            text_len=TEXT_LEN,
            image_size=SIZE,
            tokenizer=ByteTokenizer(),
            shuffle_buffer=4,
        )
        return read_all(loader)

    first, second = run(), run()
    captions = []
    for (t1, i1), (t2, i2) in zip(first, second, strict=True):
        assert t1.shape[1:] == (TEXT_LEN,) and i1.shape[1:] == (3, SIZE, SIZE)
        assert torch.equal(t1, t2)
        torch.testing.assert_close(i1, i2)
        captions += [caption_of(t) for t in t1]
    assert sorted(captions) == sorted(GOOD_WEB)
    with pytest.raises(ValueError, match="batch_size"):
        webdataset_loader(shards, batch_size=0)


def test_webdataset_rejects_bad_arguments(shards):
    for bad in [
        {"rank": 0},
        {"rank": 2, "world_size": 2},
        {"shuffle_buffer": -1},
        {"image_key": " ; "},
        {"resize_ratio": 0.0},
    ]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            web_dataset(shards, **bad)
    with pytest.raises(TypeError, match="caption_key"):
        web_dataset(shards, caption_key=None)
