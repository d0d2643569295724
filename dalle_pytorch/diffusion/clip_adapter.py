"""CLIP adapters: one interface for the CLIP models the DALL-E 2 prior and decoder condition on.

unCLIP (Ramesh et al. 2022, https://arxiv.org/abs/2204.06125) needs three things from a CLIP (Radford et al.
2021, https://arxiv.org/abs/2103.00020): the text embedding, the per-token text encodings and the image
embedding. ``BaseClipAdapter`` states that interface; ``ClipAdapter`` wraps this library's ``CLIP`` and
``OpenClipAdapter`` a model of OpenCLIP (https://github.com/mlfoundations/open_clip, optional package
``open_clip_torch``), whose documented ``encode_text`` / ``encode_image`` it calls.

An adapter is a plain object around the CLIP module (not a module itself), so a model that uses it
registers the CLIP once, under its own name, and saves it once.

Shape letters: b batch, n text positions, d embedding width, e text-encoding width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.text.tokenizer import SimpleTokenizer
from dalle_pytorch.text.tokenizer import tokenizer as default_tokenizer

# OpenAI's CLIP image normalisation, which OpenCLIP models use unless they carry their own
OPENAI_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class TextEmbeds(NamedTuple):
    """What a CLIP gives for a batch of texts."""

    text_embed: Tensor  # (b, d) unit norm
    text_encodings: Tensor  # (b, n, e) per-token features
    mask: Tensor  # (b, n) bool, True at real tokens


class BaseClipAdapter(ABC):
    """The interface of a CLIP to the prior and the decoder. ``clip`` is the wrapped ``nn.Module``.

    Subclasses give the sizes and the three encoders; texts are token ids (b, n <= max_text_len) long in the
    CLIP's own id space, images (b, image_channels, H, W) floats in [0, 1].
    """

    def __init__(self, clip: nn.Module):
        if not isinstance(clip, nn.Module):
            raise TypeError(f"clip must be an nn.Module, got {type(clip).__name__}")
        self.clip = clip

    @property
    @abstractmethod
    def dim_latent(self) -> int:
        """Width d of the text and image embeddings."""

    @property
    @abstractmethod
    def text_encoding_dim(self) -> int:
        """Width e of the per-token text encodings."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side of the square images the CLIP reads."""

    @property
    def image_channels(self) -> int:
        return 3

    @property
    @abstractmethod
    def max_text_len(self) -> int:
        """Most text tokens the CLIP reads."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Strings -> token ids (b, max_text_len) long, 0-padded, as this CLIP expects them."""

    @abstractmethod
    def embed_text(self, text: Tensor) -> TextEmbeds:
        """text (b, n) long -> TextEmbeds(text_embed (b, d), text_encodings (b, n', e), mask (b, n'))."""

    @abstractmethod
    def embed_image(self, images: Tensor) -> Tensor:
        """images (b, c, H, W) in [0, 1] -> unit-norm image embeddings (b, d)."""

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def prepare_text(self, text: str | Sequence[str] | Tensor) -> Tensor:
        """Token ids (b, n) long on the CLIP's device from strings (tokenized) or token ids (checked)."""
        if isinstance(text, str):
            text = [text]
        if not torch.is_tensor(text):
            if not isinstance(text, Sequence) or not all(isinstance(item, str) for item in text):
                raise TypeError(f"text must be a str, a list of str or a (batch, n) tensor of token ids, got {text!r}")
            text = self.tokenize(list(text))
        if text.dtype not in (torch.int64, torch.int32) or text.ndim != 2:
            raise TypeError(f"text must be a (batch, n) tensor of integer token ids, got {text.dtype} {text.ndim}-D")
        if text.shape[1] > self.max_text_len:
            raise ValueError(f"text has {text.shape[1]} tokens, more than the CLIP reads ({self.max_text_len})")
        return text.long().to(self.device)


class ClipAdapter(BaseClipAdapter):
    """This library's ``CLIP``: texts tokenized with the default CLIP BPE tokenizer, images used as given."""

    def __init__(self, clip: CLIP, tokenizer: SimpleTokenizer | None = None):
        if not isinstance(clip, CLIP):
            raise TypeError(f"ClipAdapter wraps a dalle_pytorch CLIP, got {type(clip).__name__}")
        super().__init__(clip)
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer

    @property
    def dim_latent(self) -> int:
        return self.clip.to_text_latent.out_features

    @property
    def text_encoding_dim(self) -> int:
        return self.clip.to_text_latent.in_features

    @property
    def image_size(self) -> int:
        return self.clip.image_size

    @property
    def image_channels(self) -> int:
        return self.clip.channels

    @property
    def max_text_len(self) -> int:
        return self.clip.text_seq_len

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer.tokenize(texts, context_length=self.max_text_len)

    def embed_text(self, text: Tensor) -> TextEmbeds:
        return TextEmbeds(*self.clip.embed_text(text, return_encodings=True))

    def embed_image(self, images: Tensor) -> Tensor:
        return self.clip.embed_image(images)


class OpenClipAdapter(BaseClipAdapter):
    """A model of OpenCLIP (``open_clip.create_model(name, pretrained=...)``).

    Text encodings are the per-token outputs of the text tower's final layer norm (``ln_final``), caught
    with a forward hook while the model's own ``encode_text`` runs. Images in [0, 1] are resized to the
    model's size and normalised with its mean and std. ``tokenizer`` maps a list of strings to ids (b, n);
    the default is the CLIP BPE tokenizer in OpenAI's id space (start and end tokens added), which the
    OpenAI-style OpenCLIP models use.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable[[Sequence[str]], Tensor] | None = None):
        super().__init__(clip)
        for name in ("encode_text", "encode_image", "visual", "context_length"):
            if not hasattr(clip, name):
                raise TypeError(f"clip must be an OpenCLIP model with {name!r} (open_clip.create_model), got {clip}")
        self.final_norm = clip.ln_final if hasattr(clip, "ln_final") else getattr(clip.text, "ln_final", None)
        if not isinstance(self.final_norm, nn.Module):
            raise TypeError("the OpenCLIP text tower has no ln_final: per-token text encodings are not reachable")
        self._tokenizer = tokenizer
        size = clip.visual.image_size
        self._image_size = size[0] if isinstance(size, tuple | list) else int(size)
        mean = getattr(clip.visual, "image_mean", None) or OPENAI_IMAGE_MEAN
        std = getattr(clip.visual, "image_std", None) or OPENAI_IMAGE_STD
        self.mean, self.std = torch.tensor(mean).reshape(3, 1, 1), torch.tensor(std).reshape(3, 1, 1)

    @classmethod
    def create(cls, model_name: str = "ViT-B-32", pretrained: str | None = None, **kwargs) -> OpenClipAdapter:
        """Builds ``open_clip.create_model(model_name, pretrained)``; ``pretrained=None`` downloads nothing."""
        try:
            import open_clip  # optional dependency, only needed here
        except ImportError as error:
            raise ImportError(
                "OpenClipAdapter.create needs the optional package open_clip_torch: pip install open_clip_torch"
            ) from error
        return cls(open_clip.create_model(model_name, pretrained=pretrained), **kwargs)

    @property
    def dim_latent(self) -> int:
        return int(self.clip.visual.output_dim)

    @property
    def text_encoding_dim(self) -> int:
        return int(self.final_norm.normalized_shape[0])

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def max_text_len(self) -> int:
        return int(self.clip.context_length)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        if self._tokenizer is not None:
            return self._tokenizer(texts)
        return openai_clip_tokenize(texts, self.max_text_len)

    def embed_text(self, text: Tensor) -> TextEmbeds:
        # the model adds its positional embedding over its full context: pad the ids to it with 0
        text = F.pad(text, (0, self.max_text_len - text.shape[1]))
        caught = []
        handle = self.final_norm.register_forward_hook(lambda module, args, out: caught.append(out))
        try:
            text_embed = self.clip.encode_text(text)
        finally:
            handle.remove()
        if len(caught) != 1 or caught[0].shape[:2] != text.shape:
            raise RuntimeError("the OpenCLIP text tower did not produce (b, n, width) token features in ln_final")
        return TextEmbeds(F.normalize(text_embed.float(), dim=-1), caught[0].float(), text != 0)

    def embed_image(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (batch, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        images = (images - self.mean.to(images)) / self.std.to(images)
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)


def openai_clip_tokenize(texts: Sequence[str], context_length: int, tokenizer: SimpleTokenizer | None = None) -> Tensor:
    """Ids (b, context_length) in OpenAI CLIP's id space: <|startoftext|> text <|endoftext|>, 0-padded.

    Our tokenizer shifts CLIP's ids up by one so that 0 can be padding; OpenAI's models use the unshifted ids
    (padding is 0 there too, after the end token). A text too long is cut, keeping the end token last.
    """
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer
    start, end = tokenizer.start_id - 1, tokenizer.end_id - 1
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [start] + [i - 1 for i in tokenizer.encode(text)][: context_length - 2] + [end]
        result[row, : len(ids)] = torch.tensor(ids)
    return result


def as_clip_adapter(clip: nn.Module | BaseClipAdapter) -> BaseClipAdapter:
    """An adapter for ``clip``: adapters pass through, our ``CLIP`` is wrapped; anything else is a TypeError."""
    if isinstance(clip, BaseClipAdapter):
        return clip
    if isinstance(clip, CLIP):
        return ClipAdapter(clip)
    raise TypeError(
        f"clip must be a dalle_pytorch CLIP or a BaseClipAdapter (e.g. OpenClipAdapter), got {type(clip).__name__}"
    )
