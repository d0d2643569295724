"""Precomputed CLIP embeddings: shards equal CLIP's own embeddings, interrupted runs resume exactly, the CLI."""

import io
import json
import tarfile

import pytest
import torch
from conftest import make_clip

from dalle_pytorch.cli import dalle2_embed
from dalle_pytorch.data import embeddings
from dalle_pytorch.data.embeddings import INDEX_NAME, ClipEmbeddingsDataset, precompute_clip_embeddings, read_index
from dalle_pytorch.data.shapes import ShapesDataset, write_folder
from dalle_pytorch.data.text_image import TextImageDataset
from dalle_pytorch.diffusion.clip_adapter import ClipAdapter
from dalle_pytorch.text.tokenizer import tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TEXT_LEN = 12


@pytest.fixture(scope="module")
def clip():
    # the default BPE tokenizer's vocabulary, so the shapes captions need no tokenizer training
    return make_clip(num_text_tokens=tokenizer.vocab_size, text_seq_len=TEXT_LEN).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(ShapesDataset(5, image_size=16), tmp_path_factory.mktemp("shapes") / "data")


def dataset(folder, resize_ratio=1.0):
    return TextImageDataset(folder, text_len=TEXT_LEN, image_size=16, resize_ratio=resize_ratio, truncate_captions=True)


def read_all(output_dir, **options):
    data = ClipEmbeddingsDataset(output_dir, **options)
    rows = [data[i] for i in range(len(data))]
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def test_embeddings_read_back_equal_clips_own(clip, folder, tmp_path):
    out = precompute_clip_embeddings(clip, dataset(folder), tmp_path / "emb", shard_size=2, batch_size=3)
    index = read_index(out)
    assert index["complete"] and index["total"] == 5 and index["dim"] == 16
    assert [shard["count"] for shard in index["shards"]] == [2, 2, 1]
    stored = read_all(out)
    # the whole square image and a one-line caption: nothing random, CLIP can be run directly on the pairs
    text, images = (torch.stack(column) for column in zip(*[dataset(folder)[i] for i in range(5)]))
    with torch.no_grad():
        torch.testing.assert_close(stored["image_embed"], clip.embed_image(images))
        torch.testing.assert_close(stored["text_embed"], clip.embed_text(text))
    assert torch.equal(stored["text"], text) and stored["text"].dtype == torch.long
    data = ClipEmbeddingsDataset(out, cache_shards=1)
    assert len(data) == 5 and data.dim == 16
    torch.testing.assert_close(data[-1]["image_embed"], stored["image_embed"][4], rtol=0, atol=0)
    with pytest.raises(IndexError):
        data[5]
    # a finished folder is left alone when run again
    before = (out / INDEX_NAME).read_text()
    precompute_clip_embeddings(clip, dataset(folder), out, shard_size=2, batch_size=3)
    assert (out / INDEX_NAME).read_text() == before


def dies_on_call(number, function):
    """`function`, except that its call `number` raises KeyboardInterrupt (a kill at that point)."""
    calls = []

    def wrapped(*args):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return function(*args)

    return wrapped


def test_an_interrupted_run_keeps_whole_shards_and_resumes_exactly(clip, folder, tmp_path, monkeypatch):
    options = dict(shard_size=2, batch_size=1, seed=5)
    reference = precompute_clip_embeddings(clip, dataset(folder, 0.6), tmp_path / "reference", **options)
    embed_batch, write_index = embeddings._embed_batch, embeddings._write_index
    monkeypatch.setattr(embeddings, "_embed_batch", dies_on_call(4, embed_batch))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        precompute_clip_embeddings(clip, dataset(folder, 0.6), out, **options)
    index = read_index(out)
    assert not index["complete"] and [shard["count"] for shard in index["shards"]] == [2]
    assert sorted(path.name for path in out.iterdir()) == [INDEX_NAME, "shard-00000.safetensors"]
    with pytest.raises(ValueError, match="unfinished"):
        ClipEmbeddingsDataset(out)
    assert len(ClipEmbeddingsDataset(out, allow_incomplete=True)) == 2

    # a crash after a shard is written but before the index names it: the shard is written again
    monkeypatch.setattr(embeddings, "_embed_batch", embed_batch)
    monkeypatch.setattr(embeddings, "_write_index", dies_on_call(1, write_index))
    with pytest.raises(KeyboardInterrupt):
        precompute_clip_embeddings(clip, dataset(folder, 0.6), out, **options)
    assert (out / "shard-00001.safetensors").is_file() and read_index(out)["total"] == 2

    precompute_clip_embeddings(clip, dataset(folder, 0.6), out, **options)
    resumed, expected = read_all(out), read_all(reference)
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    # the crops are random (seeded per sample): another seed embeds other crops
    other = read_all(precompute_clip_embeddings(clip, dataset(folder, 0.6), tmp_path / "other", shard_size=2,
                                                batch_size=1, seed=6))  # fmt: skip
    assert not torch.equal(other["image_embed"], expected["image_embed"])


def test_text_encodings_and_a_clip_adapter_give_clips_own_features(clip, folder, tmp_path):
    options = dict(shard_size=2, batch_size=2, save_text_encodings=True)
    direct = read_all(precompute_clip_embeddings(clip, dataset(folder), tmp_path / "clip", **options))
    adapted = read_all(precompute_clip_embeddings(ClipAdapter(clip), dataset(folder), tmp_path / "adapter", **options))
    assert set(direct) == set(adapted) == {"image_embed", "text_embed", "text", "text_encodings", "text_mask"}
    for key in direct:
        assert torch.equal(direct[key], adapted[key]), key
    text = torch.stack([dataset(folder)[i][0] for i in range(5)])
    with torch.no_grad():
        text_embed, encodings, mask = clip.embed_text(text, return_encodings=True)
    torch.testing.assert_close(direct["text_encodings"], encodings)
    torch.testing.assert_close(direct["text_embed"], text_embed)
    assert torch.equal(direct["text_mask"], mask) and direct["text_mask"].dtype == torch.bool
    assert direct["text_encodings"].shape == (5, TEXT_LEN, 32)


def test_other_settings_in_the_same_folder_are_refused(clip, folder, tmp_path):
    out = precompute_clip_embeddings(clip, dataset(folder), tmp_path / "emb", shard_size=2, batch_size=2)
    with pytest.raises(ValueError, match="shard_size"):
        precompute_clip_embeddings(clip, dataset(folder), out, shard_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        precompute_clip_embeddings(clip, dataset(folder), tmp_path / "new", batch_size=0)
    with pytest.raises(TypeError, match="clip"):
        precompute_clip_embeddings(torch.nn.Linear(2, 2), dataset(folder), tmp_path / "new")
    with pytest.raises(FileNotFoundError, match=INDEX_NAME):
        ClipEmbeddingsDataset(tmp_path / "new")


def write_shards(folder, path):
    """The folder's pairs as one WebDataset tar shard."""
    with tarfile.open(path, "w") as tar:
        for image in sorted(folder.glob("*.png")):
            for file in (image, image.with_suffix(".txt")):
                info = tarfile.TarInfo(file.name)
                info.size = file.stat().st_size
                tar.addfile(info, io.BytesIO(file.read_bytes()))
    return path


def test_cli_embeds_a_folder_and_webdataset_shards_alike(clip, folder, tmp_path, capsys):
    pytest.importorskip("webdataset")
    clip_dir = clip.save_pretrained(tmp_path / "clip")
    common = ["--clip-path", str(clip_dir), "--shard-size", "3", "--batch-size", "2", "--device", "cpu",
              "--truncate-captions"]  # fmt: skip
    dalle2_embed.main([*common, "--image-folder", str(folder), "--output-dir", str(tmp_path / "folder"),
                       "--text-encodings"])  # fmt: skip
    shard = write_shards(folder, tmp_path / "pairs.tar")
    dalle2_embed.main([*common, "--wds", str(shard), "--output-dir", str(tmp_path / "wds"), "--no-text-tokens"])
    from_folder, from_shards = read_all(tmp_path / "folder"), read_all(tmp_path / "wds")
    assert set(from_shards) == {"image_embed", "text_embed"} and len(from_folder["text"]) == 5
    assert from_folder["text_encodings"].shape == (5, TEXT_LEN, 32)
    for key in from_shards:
        torch.testing.assert_close(from_shards[key], from_folder[key])
    args = json.loads((tmp_path / "folder" / "args.json").read_text())
    assert args["tool"] == "dalle2-embed" and args["clip_checkpoint"] == str(clip_dir)
    with pytest.raises(SystemExit) as stop:
        dalle2_embed.main([*common, "--image-folder", str(folder), "--output-dir", str(tmp_path / "x"),
                           "--shard-size", "0"])  # fmt: skip
    assert stop.value.code == 2 and "shard_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dalle2_embed.main(["--clip-path", str(clip_dir), "--output-dir", str(tmp_path / "x")])  # no data given


def test_every_flag_has_help_and_the_dashed_spelling():
    for action in dalle2_embed.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            for spelling in action.option_strings:
                assert spelling.replace("_", "-") in action.option_strings, spelling
