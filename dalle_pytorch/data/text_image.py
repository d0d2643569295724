"""Image-text pairs from a folder: `TextImageDataset`, and the preprocessing it shares with the WebDataset
pipeline in `dalle_pytorch.data.webdata`.

A sample is an image file (png, jpg, jpeg, bmp, webp; any case of the extension) and a text file with the
same path minus extension next to it, holding one caption per line. Images become float tensors in [0, 1]
after a square random resized crop (as in Inception training, https://arxiv.org/abs/1409.4842, section 6,
restricted to aspect ratio 1). Real folders hold broken files, so every failure to read one sample is
skipped, warned about once and counted instead of ending a training run: unreadable, truncated, oversized
or non-regular files (see `dalle_pytorch.data.limits`), binary captions and captions too long to tokenize.

Pillow modes: https://pillow.readthedocs.io/en/stable/handbook/concepts.html#modes
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch.utils.data import Dataset

from dalle_pytorch.data import limits
from dalle_pytorch.data.limits import read_capped
from dalle_pytorch.io.files import NotARegularFileError, open_regular_file
from dalle_pytorch.text.captions import CAPTION_EXTENSION, BadSampleError, captions_from_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Exceptions that mean "this one sample's files are unusable": Pillow raises OSError (also for truncated
# files and UnidentifiedImageError), SyntaxError or ValueError for some malformed headers, EOFError for
# cut-off frames, and DecompressionBombError for absurdly large images.
SAMPLE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class Tokenizer(Protocol):
    def tokenize(
        self, texts: str | list[str], context_length: int = 256, truncate_text: bool = False
    ) -> torch.Tensor: ...


class SkipLog:
    """Counts skipped samples by reason and warns once per skipped file or shard.

    `counts` is a Counter such as {"corrupt image": 2, "empty caption": 1}. With DataLoader workers every
    worker process holds its own copy, so counts made inside workers stay there (the warnings still print).
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.files: dict[str, str] = {}  # path or key -> reason

    def record(self, where: str, reason: str, detail: str = "") -> None:
        if where in self.files:
            return
        self.files[where] = reason
        self.counts[reason] += 1
        message = f"skipping {where} ({reason}{': ' + detail if detail else ''})"
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def total(self) -> int:
        return sum(self.counts.values())


def reason_for(error: BaseException, kind: str) -> str:
    """A short category for counting why a sample of `kind` ('image', 'caption', 'shard') was skipped."""
    if isinstance(error, BadSampleError):
        return error.reason
    if isinstance(error, NotARegularFileError):
        return "not a regular file"
    if isinstance(error, FileNotFoundError):
        return "missing file"
    return "corrupt image" if kind == "image" else f"unreadable {kind}"


# ---------------------------------------------------------------------------------------------- captions


def pick_caption(captions: list[str]) -> str:
    """One caption chosen uniformly with torch's RNG (so DataLoader worker seeding makes it reproducible)."""
    return captions[int(torch.randint(len(captions), ()))]


def tokenize_caption(tokenizer: Tokenizer, caption: str, text_len: int, truncate: bool, where: str) -> torch.Tensor:
    """LongTensor (text_len,) of token ids, zero-padded on the right.

    A caption the tokenizer refuses (longer than `text_len` without `truncate`) is a bad sample:
    BadSampleError('caption too long'), naming the file, so datasets skip and count it like a broken file.
    """
    try:
        return tokenizer.tokenize(caption, text_len, truncate_text=truncate)[0]
    except ValueError as error:
        hint = "" if truncate else "; pass truncate_captions=True (--truncate_captions) to cut long captions"
        raise BadSampleError("caption too long", f"caption of {where}: {error}{hint}") from error


class NoUsableSampleError(RuntimeError, ValueError):
    """Every sample of a dataset was skipped (the message gives the reasons and an example file). A
    RuntimeError as before, and a ValueError like the other bad-input errors the command-line tools report."""


def default_tokenizer() -> Tokenizer:
    # imported here so that this module (and folders without text) work before the vocabulary is loaded
    from dalle_pytorch.text.tokenizer import tokenizer

    return tokenizer


def check_tokenizer(tokenizer: Any) -> Tokenizer:
    if tokenizer is None:
        return default_tokenizer()
    if not callable(getattr(tokenizer, "tokenize", None)):
        raise TypeError(
            "tokenizer must have a tokenize(texts, context_length, truncate_text) method, "
            f"got {type(tokenizer).__name__}"
        )
    return tokenizer


# ------------------------------------------------------------------------------------------------ images


def open_image(source: str | os.PathLike | Any) -> Image.Image:
    """Open and fully decode an image (a path or a binary file object), so truncation fails here.

    A path must be a regular file of at most `limits.MAX_IMAGE_BYTES`; an image of more than
    `limits.MAX_IMAGE_PIXELS` pixels is refused from its header, before decoding. Both raise BadSampleError.
    """
    if isinstance(source, str | os.PathLike):
        with open_regular_file(source) as file:
            if os.fstat(file.fileno()).st_size > limits.MAX_IMAGE_BYTES:
                raise BadSampleError("image too large", f"{source} is larger than {limits.MAX_IMAGE_BYTES} bytes")
            return _decode_image(file, str(source))
    return _decode_image(source, "image")


def _decode_image(file: Any, where: str) -> Image.Image:
    with Image.open(file) as image:
        if image.width * image.height > limits.MAX_IMAGE_PIXELS:
            raise BadSampleError(
                "image too large",
                f"{where} is {image.width}x{image.height} pixels, more than "
                f"dalle_pytorch.data.limits.MAX_IMAGE_PIXELS = {limits.MAX_IMAGE_PIXELS}",
            )
        image.load()
        return image.copy()  # closing the file releases the decoded pixels of `image` itself


def to_model_mode(image: Image.Image, transparent: bool) -> Image.Image:
    """RGBA when `transparent`, else RGB with any transparency composited on white."""
    if image.mode.startswith("I;16"):
        # 16-bit grayscale: Pillow's convert would clip instead of rescaling 0..65535 to 0..255
        array = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L")

    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if transparent:
        return image if image.mode == "RGBA" else image.convert("RGBA")
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def random_square_box(width: int, height: int, resize_ratio: float) -> tuple[float, float, float, float]:
    """A square (left, top, right, bottom) covering a uniformly random fraction in [resize_ratio, 1] of the
    image area, capped at the largest square that fits, at a uniformly random position (torch's RNG)."""
    scale = resize_ratio + (1.0 - resize_ratio) * float(torch.rand(()))
    side = min(math.sqrt(scale * width * height), width, height)
    left = (width - side) * float(torch.rand(()))
    top = (height - side) * float(torch.rand(()))
    return left, top, left + side, top + side


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor (c, h, w) in [0, 1]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy; torch.from_numpy warns on read-only arrays
    if array.ndim == 2:
        array = array[:, :, None]
    return rearrange(torch.from_numpy(array), "h w c -> c h w").float().div(255.0).contiguous()


def preprocess_image(
    image: Image.Image, image_size: int, resize_ratio: float = 0.75, transparent: bool = False
) -> torch.Tensor:
    """Random square crop resized to `image_size`: float tensor (c, image_size, image_size) in [0, 1],
    c = 4 when `transparent` else 3."""
    image = to_model_mode(image, transparent)
    box = random_square_box(image.width, image.height, resize_ratio)
    # resize with a box crops and resamples in one step, at sub-pixel precision
    resized = image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    return image_to_tensor(resized)


def check_image_options(text_len: int, image_size: int, resize_ratio: float) -> None:
    for name, value in (("text_len", text_len), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(resize_ratio, bool) or not isinstance(resize_ratio, (int, float)):
        raise TypeError(f"resize_ratio must be a number in (0, 1], got {resize_ratio!r}")
    if not 0.0 < resize_ratio <= 1.0:
        raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio!r}")


# ------------------------------------------------------------------------------------------------ folder


def index_folder(folder: Path) -> tuple[list[tuple[Path, Path]], list[Path], list[Path]]:
    """Walk `folder` recursively and match images with captions by path without extension.

    Returns (pairs of (image, caption), images without caption, captions without image), each in a
    reproducible order (names sorted within each folder).
    Hidden files and folders (name starting with '.') are ignored; symlinked folders are not followed.
    Two images with one stem (cat.png, cat.jpg) are two samples sharing cat.txt.
    """
    images: list[Path] = []
    captions: dict[Path, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root, name)
            suffix = path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                images.append(path)
            elif suffix == CAPTION_EXTENSION:
                captions.setdefault(path.with_suffix(""), path)
    stems = [image.with_suffix("") for image in images]
    pairs = [(image, captions[stem]) for image, stem in zip(images, stems) if stem in captions]
    orphan_images = [image for image, stem in zip(images, stems) if stem not in captions]
    image_stems = set(stems)
    orphan_captions = [path for stem, path in captions.items() if stem not in image_stems]
    return pairs, orphan_images, sorted(orphan_captions)


class TextImageDataset(Dataset):
    """Image-caption pairs from a folder, as `(text_tokens, image)`.

    text_tokens: LongTensor (text_len,), one caption line of the sample chosen at random, zero-padded.
    image: float tensor (3, image_size, image_size) in [0, 1], or 4 channels (RGBA) when `transparent`.

    Unpaired files are counted in `images_without_caption` / `captions_without_image` and reported in one
    warning. A sample that cannot be read (corrupt or truncated image, empty caption, file deleted since
    indexing) is warned about once, counted in `skipped` (a Counter of reasons), and replaced by the next
    readable sample in index order, so `dataset[i]` is deterministic given torch's RNG state.

    `shuffle=True` fixes a random order of the samples at construction (drawn from torch's global RNG).
    A DataLoader with `shuffle=True` already draws a new order every epoch, so the two are not needed
    together; `shuffle` is for consumers that read indices in order, e.g. to take a random subset with
    `Subset(dataset, range(n))`. Crops and caption choices use torch's RNG, so with DataLoader workers
    they are reproducible when the loader has a seeded `generator` (and in the main process after
    `torch.manual_seed`).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        text_len: int = 256,
        image_size: int = 128,
        truncate_captions: bool = False,
        resize_ratio: float = 0.75,
        transparent: bool = False,
        tokenizer: Tokenizer | None = None,
        shuffle: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"folder must be a path, got {type(folder).__name__}")
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"folder must be an existing directory, got {str(folder)!r}")
        check_image_options(text_len, image_size, resize_ratio)

        self.folder = root
        self.text_len = text_len
        self.image_size = image_size
        self.truncate_captions = truncate_captions
        self.resize_ratio = resize_ratio
        self.transparent = transparent
        self.skip_log = SkipLog()
        self._bad: set[int] = set()  # positions known to be unreadable, not retried

        pairs, orphan_images, orphan_captions = index_folder(root)
        self.images_without_caption = len(orphan_images)
        self.captions_without_image = len(orphan_captions)
        if orphan_images or orphan_captions:
            examples = [str(path) for path in (orphan_images[:2] + orphan_captions[:2])]
            warnings.warn(
                f"{root}: {len(orphan_images)} image(s) without a caption file and {len(orphan_captions)} "
                f"caption file(s) without an image are not used (e.g. {', '.join(examples)})",
                RuntimeWarning,
                stacklevel=2,
            )
        if not pairs:
            raise ValueError(
                f"folder {str(folder)!r} holds no image with a same-named .txt caption file "
                f"(image extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        if shuffle:
            pairs = [pairs[i] for i in torch.randperm(len(pairs)).tolist()]
        self.pairs = pairs
        self.tokenizer = check_tokenizer(tokenizer)

    @property
    def skipped(self) -> Counter[str]:
        """Counter of skipped samples by reason, e.g. {'corrupt image': 2, 'empty caption': 1}."""
        return self.skip_log.counts

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(self.pairs)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for a dataset of {count} samples")
        index %= count
        # at most one pass over the dataset: a bad sample moves on to the next, never recursing
        for offset in range(count):
            position = (index + offset) % count
            if position in self._bad:
                continue
            sample = self._load(position)
            if sample is not None:
                return sample
        raise self._no_usable_sample()

    def _no_usable_sample(self) -> NoUsableSampleError:
        example = next(iter(self.skip_log.files.items()), None)
        detail = f"; e.g. {example[0]} ({example[1]})" if example else ""
        if self.skipped["caption too long"]:
            detail += "; pass truncate_captions=True (--truncate_captions) to cut long captions"
        return NoUsableSampleError(
            f"no readable sample in {self.folder}: all {self.skip_log.total()} samples read failed "
            f"({dict(self.skipped)}){detail}"
        )

    def _load(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        image_path, caption_path = self.pairs[position]
        # every file is read before any random draw, so a bad sample never shifts torch's RNG stream
        try:
            captions = captions_from_bytes(read_capped(caption_path, limits.MAX_CAPTION_BYTES, "caption"))
        except SAMPLE_ERRORS as error:
            return self._skip(position, caption_path, reason_for(error, "caption"), error)
        try:
            pixels = open_image(image_path)
        except SAMPLE_ERRORS as error:
            return self._skip(position, image_path, reason_for(error, "image"), error)
        caption = pick_caption(captions)
        image = preprocess_image(pixels, self.image_size, self.resize_ratio, self.transparent)
        try:
            tokens = tokenize_caption(self.tokenizer, caption, self.text_len, self.truncate_captions, str(caption_path))
        except BadSampleError as error:
            return self._skip(position, caption_path, error.reason, error)
        return tokens, image

    def _skip(self, position: int, path: Path, reason: str, error: BaseException) -> None:
        # the bad position is remembered so later epochs skip it without decoding it again
        self._bad.add(position)
        self.skip_log.record(str(path), reason, str(error))
        return None

    def check(self, max_samples: int = 256) -> Counter[str]:
        """Read the first `max_samples` samples (bad ones are counted and remembered, torch's RNG state is
        left as it was) before training starts; returns `skipped`.

        Raises NoUsableSampleError when none of them is usable, so a folder whose captions all need
        `truncate_captions`, or that holds only broken files, fails before the first step, not mid-run.
        """
        positions = [position for position in range(min(len(self.pairs), max_samples)) if position not in self._bad]
        with torch.random.fork_rng(devices=[]):
            usable = sum(self._load(position) is not None for position in positions)
        if not usable:
            raise self._no_usable_sample()
        return self.skipped

    def verify(self) -> Counter[str]:
        """Read every sample once (in this process, before forking DataLoader workers) so that bad ones
        are counted up front and skipped without retrying later; returns `skipped`. Leaves torch's RNG
        state as it was."""
        with torch.random.fork_rng(devices=[]):
            for position in range(len(self.pairs)):
                if position not in self._bad:
                    self._load(position)
        return self.skipped
