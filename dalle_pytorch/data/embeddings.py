"""Precomputed CLIP embeddings of image-text pairs: written once in shards, read back without CLIP.

DALL-E 2's prior maps a CLIP text embedding to a CLIP image embedding (https://arxiv.org/abs/2204.06125);
its decoder is conditioned on the image embedding. Both see every pair many times, so the embeddings are
computed once (`precompute_clip_embeddings`, the `dalle2-embed` tool) and training reads them back with
`ClipEmbeddingsDataset`, never loading CLIP again.

Layout of an embeddings folder:
- `shard-00000.safetensors`, ...: `image_embed` (n, d) and `text_embed` (n, d) float32, unit norm, and
  optionally `text` (n, text_len) int64 token ids and the CLIP's per-token text features the prior can
  attend to, `text_encodings` (n, text_len, e) float32 with `text_mask` (n, text_len) bool (True at real
  tokens); every shard holds `shard_size` pairs, the last maybe fewer;
- `index.json`: the format, dimensions, the shards written so far with their sizes, and `complete`.

Every shard and every update of the index is written atomically (`dalle_pytorch.io.atomic`), and a shard
enters the index only after it is on disk, so an interrupted run leaves an index of whole shards. Running
again with the same source continues after them: the samples are read in a fixed order, each with its own
seed for random crops and caption choices, so a resumed run writes what an uninterrupted one would have.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from dalle_pytorch.io.atomic import atomic_write_file

__all__ = ["INDEX_NAME", "ClipEmbeddingsDataset", "WithImageEmbeddings", "precompute_clip_embeddings", "read_index"]

INDEX_NAME = "index.json"
FORMAT_NAME = "dalle_pytorch.clip_embeddings"
FORMAT_VERSION = 1


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked `index.json` of an embeddings folder."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {INDEX_NAME}: not an embeddings folder (see dalle2-embed)")
    index = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} index")
    if index.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {index['format_version']}; this library reads {FORMAT_VERSION}")
    return index


def _write_index(folder: Path, index: dict[str, Any]) -> None:
    text = json.dumps(index, indent=2) + "\n"
    atomic_write_file(folder / INDEX_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _samples(dataset: Dataset | IterableDataset, start: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(text tokens, image) pairs from position `start` on, in a fixed order with fixed random draws."""
    if isinstance(dataset, IterableDataset):
        # a stream can only be skipped by reading it: the skipped samples make the same random draws
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for position, sample in enumerate(dataset):
                if position >= start:
                    yield sample
        return
    for position in range(start, len(dataset)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + position)  # each sample's crop and caption, whatever the start
            sample = dataset[position]
        yield sample


@torch.no_grad()
def precompute_clip_embeddings(
    clip: Any,
    dataset: Dataset | IterableDataset,
    output_dir: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    batch_size: int = 64,
    save_text_tokens: bool = True,
    save_text_encodings: bool = False,
    seed: int = 0,
    source: str | None = None,
) -> Path:
    """Embeds every `(text tokens (text_len,), image (c, H, W))` pair of `dataset` (a `TextImageDataset`, a
    `TextImageWebDataset` or any dataset of such pairs, with CLIP's image size and at most its text length)
    with `clip` into shards in `output_dir`; returns `output_dir`. `clip`: a `dalle_pytorch.CLIP` (or a module
    with its `embed_text` / `embed_image`), or a DALL-E 2 CLIP adapter (`dalle_pytorch.diffusion.clip_adapter`,
    e.g. for OpenCLIP); it runs on the device it is on. `save_text_encodings` needs a CLIP or an adapter.

    A folder with an unfinished run of the same `source`, `shard_size` and embedding width is continued;
    a finished one is left as it is. `source` names the data in the index (e.g. the folder or shard URLs).
    """
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    module = clip if isinstance(clip, nn.Module) else getattr(clip, "clip", None)  # an adapter wraps its CLIP
    methods = all(callable(getattr(clip, name, None)) for name in ("embed_text", "embed_image"))
    if not methods or not isinstance(module, nn.Module):
        raise TypeError(f"clip must be a CLIP or a CLIP adapter (embed_text, embed_image), got {type(clip).__name__}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = next(module.parameters()).device
    index = _start_index(output_dir, shard_size, save_text_tokens, save_text_encodings, seed, source)
    if index["complete"]:
        return output_dir
    keys = ["image_embed", "text_embed"] + ["text"] * save_text_tokens
    keys += ["text_encodings", "text_mask"] * save_text_encodings
    was_training = module.training
    module.eval()
    try:
        pending: dict[str, list[Tensor]] = {key: [] for key in keys}
        batch: list[tuple[Tensor, Tensor]] = []
        for sample in _samples(dataset, index["total"], seed):
            batch.append(sample)
            if len(batch) == batch_size:
                _embed_batch(clip, batch, pending, device)
                batch = []
            if sum(len(chunk) for chunk in pending["image_embed"]) >= shard_size:
                _flush(output_dir, index, pending, shard_size)
        if batch:
            _embed_batch(clip, batch, pending, device)
        while pending["image_embed"]:
            _flush(output_dir, index, pending, shard_size)
        index["complete"] = True
        _write_index(output_dir, index)
    finally:
        module.train(was_training)
    return output_dir


def _start_index(
    folder: Path, shard_size: int, save_text_tokens: bool, save_text_encodings: bool, seed: int, source: str | None
) -> dict:
    """The index to continue: the folder's own if it matches these settings, else a new empty one."""
    settings = {"shard_size": shard_size, "text_tokens": save_text_tokens, "text_encodings": save_text_encodings,
                "seed": seed, "source": source}  # fmt: skip
    if not (folder / INDEX_NAME).is_file():
        if any(folder.glob("shard-*.safetensors")):
            raise ValueError(f"{folder} holds shards but no {INDEX_NAME}; give an empty or new output folder")
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **settings, "dim": None, "total": 0,
                "shards": [], "complete": False}  # fmt: skip
    index = read_index(folder)
    differing = [key for key, value in settings.items() if index.get(key) != value]
    if differing:
        raise ValueError(
            f"{folder} holds embeddings made with other settings ({', '.join(differing)}): "
            f"{ {key: index.get(key) for key in differing} }; use a new output folder"
        )
    return index


def _embed_batch(clip: Any, batch: list[tuple[Tensor, Tensor]], pending: dict[str, list[Tensor]], device) -> None:
    text = torch.stack([tokens for tokens, _ in batch]).to(device)  # (b, text_len)
    images = torch.stack([image for _, image in batch]).to(device)  # (b, c, H, W)
    embedded = {"image_embed": clip.embed_image(images).float(), "text": text.long()}
    if not isinstance(clip, nn.Module):  # an adapter: TextEmbeds(text_embed, text_encodings, mask)
        embedded["text_embed"], encodings, mask = clip.embed_text(text)
    elif "text_encodings" in pending:
        embedded["text_embed"], encodings, mask = clip.embed_text(text, return_encodings=True)
    else:
        embedded["text_embed"], encodings, mask = clip.embed_text(text), None, None
    if "text_encodings" in pending:
        embedded["text_encodings"], embedded["text_mask"] = encodings.float(), mask.bool()
    for key in pending:
        pending[key].append(embedded[key].cpu())


def _flush(folder: Path, index: dict[str, Any], pending: dict[str, list[Tensor]], shard_size: int) -> None:
    """Writes the first `shard_size` pending pairs (or all that are left) as the next shard, then the index."""
    joined = {key: torch.cat(chunks) for key, chunks in pending.items()}
    shard = {key: tensor[:shard_size].contiguous() for key, tensor in joined.items()}
    for key, tensor in joined.items():
        pending[key] = [tensor[shard_size:]] if len(tensor) > shard_size else []
    count, dim = shard["image_embed"].shape
    if index["dim"] not in (None, dim):
        raise ValueError(f"embedding width changed from {index['dim']} to {dim} within one folder")
    name = shard_name(len(index["shards"]))
    atomic_write_file(folder / name, lambda tmp: save_file(shard, str(tmp)))
    index["shards"].append({"file": name, "count": count})
    index["dim"], index["total"] = dim, index["total"] + count
    _write_index(folder, index)


class ClipEmbeddingsDataset(Dataset):
    """The pairs of an embeddings folder: `dataset[i]` is a dict of `image_embed` (d,), `text_embed` (d,)
    float32 and, when stored, `text` (text_len,) int64, `text_encodings` (text_len, e) float32 and `text_mask`
    (text_len,) bool. Shards are loaded when first read and the last `cache_shards` kept in memory, so
    reading in order (or shuffling within shards) stays cheap. An unfinished folder can be read (its whole
    shards) with `allow_incomplete=True`."""

    def __init__(self, folder: str | os.PathLike, *, cache_shards: int = 2, allow_incomplete: bool = False):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        if not self.index["complete"] and not allow_incomplete:
            raise ValueError(f"{folder} is an unfinished run of dalle2-embed; finish it or pass allow_incomplete=True")
        if cache_shards < 1:
            raise ValueError(f"cache_shards must be >= 1, got {cache_shards}")
        self.cache_shards = cache_shards
        self.shards = self.index["shards"]
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard["count"])
        self.dim = self.index["dim"]
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} embedded pairs")
        index %= len(self)
        number = bisect.bisect_right(self.starts, index) - 1
        return {key: tensor[index - self.starts[number]] for key, tensor in self._shard(number).items()}

    def _shard(self, number: int) -> dict[str, Tensor]:
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        entry = self.shards[number]
        tensors = load_file(str(self.folder / entry["file"]))
        expected = {"image_embed", "text_embed"} | ({"text"} if self.index["text_tokens"] else set())
        expected |= {"text_encodings", "text_mask"} if self.index.get("text_encodings") else set()
        if set(tensors) != expected or any(len(t) != entry["count"] for t in tensors.values()):
            raise ValueError(f"{self.folder / entry['file']} does not match {INDEX_NAME} (keys or sample count)")
        self._cache[number] = tensors
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return tensors


class WithImageEmbeddings(Dataset):
    """`(text, image)` pairs of `dataset` with the stored CLIP image embedding of the same sample appended:
    `(text, image, image_embed (d,))`, for training the decoder without running CLIP. Sample i of `dataset`
    must be the one embedded as pair i (the same folder `dalle2-embed` read, read in the same order)."""

    def __init__(self, dataset: Dataset, embeddings: ClipEmbeddingsDataset):
        if len(dataset) != len(embeddings):
            raise ValueError(
                f"the images have {len(dataset)} samples but the embeddings {len(embeddings)} pairs: embed the same "
                "folder with dalle2-embed"
            )
        self.dataset, self.embeddings = dataset, embeddings

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        text, image = self.dataset[index]
        return text, image, self.embeddings[index]["image_embed"]
