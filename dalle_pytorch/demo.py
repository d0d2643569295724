"""The demo pipeline: train DALL-E from scratch on the built-in shapes dataset and measure what it learnt.

    render shapes -> word tokenizer -> DiscreteVAE -> image codes (computed once) -> DALLE -> (CLIP)
    -> generate for every colour x shape prompt, held-out pairs included -> judge -> grid.png, report.json

Each step is a function that works on its own; :func:`run_demo` chains them and ``dalle-demo`` runs it.
The grid and the report are drawn up by ``dalle_pytorch.demo_report``.

- DALL-E (Ramesh et al. 2021, https://arxiv.org/abs/2102.12092): a discrete VAE turns images into tokens
  and a transformer learns [text | image tokens]. As in the paper, the VAE's temperature is annealed
  towards 1/16; a small KL-to-uniform weight keeps many codes in use (without it a VAE this small tends to
  collapse onto a handful of codes and loses colours).
- Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598): the caption is dropped
  from a fraction of training samples (``null_cond_prob``) so that sampling can push the text-conditioned
  logits away from the unconditioned ones (``cond_scale``). This mostly helps the held-out pairs.
- CLIP reranking (Radford et al. 2021, https://arxiv.org/abs/2103.00020), optional: generate several
  candidates per sample and keep the one a small CLIP scores highest.
- The judge (``dalle_pytorch.eval``): colour from pixels, shape from a classifier trained on ground truth.

Captions are tokenized word by word: the dataset's vocabulary is some 25 words, and one token per word makes
"red" and "circle" single symbols the transformer can recombine for the held-out pairs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import Tensor, nn
from tqdm.auto import tqdm

from dalle_pytorch.clip import CLIP
from dalle_pytorch.dalle import DALLE
from dalle_pytorch.demo_report import Stopwatch, make_grid, write_grid_and_report
from dalle_pytorch.eval import evaluate_fidelity, train_shape_classifier
from dalle_pytorch.shapes import (
    NUM_PHRASINGS,
    ShapeAttributes,
    ShapePrompt,
    ShapesDataset,
    caption_for,
    evaluation_prompts,
    heldout_pairs,
)
from dalle_pytorch.tokenizer import HugTokenizer
from dalle_pytorch.vae import DiscreteVAE

__all__ = [
    "DEFAULT_CONFIG",
    "FAST_CONFIG",
    "DemoConfig",
    "TrainingSet",
    "build_word_tokenizer",
    "caption_ids",
    "generate_for_prompts",
    "make_grid",
    "render_training_set",
    "resolve_device",
    "run_demo",
    "train_clip",
    "train_dalle",
    "train_vae",
]


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo. Steps are optimiser steps; ``clip_steps=0`` skips CLIP reranking."""

    image_size: int = 32
    num_train_images: int = 4000
    # discrete VAE: 32 / 2**2 = an 8x8 grid of codes
    vae_num_layers: int = 2
    vae_num_tokens: int = 128
    vae_hidden_dim: int = 32
    vae_codebook_dim: int = 32
    vae_kl_weight: float = 0.01
    vae_steps: int = 1200
    vae_batch_size: int = 32
    vae_learning_rate: float = 3e-3
    vae_final_temperature: float = 1 / 16
    # DALLE
    dalle_dim: int = 128
    dalle_depth: int = 3
    dalle_heads: int = 4
    dalle_ff_mult: int = 2
    dalle_steps: int = 1600
    dalle_batch_size: int = 32
    dalle_learning_rate: float = 2e-3
    null_cond_prob: float = 0.2
    # CLIP for reranking
    clip_steps: int = 500
    clip_dim: int = 64
    clip_batch_size: int = 64
    clip_learning_rate: float = 1e-3
    # the judge's shape classifier
    classifier_steps: int = 150
    # generation
    samples_per_prompt: int = 8
    candidates_per_sample: int = 4
    cond_scale: float = 1.5
    temperature: float = 0.7
    filter_thres: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{field.name} must be an int, got {value!r}")
            minimum = 0 if field.name in ("clip_steps", "seed") else 1
            if field.type == "int" and value < minimum:
                raise ValueError(f"{field.name} must be >= {minimum}, got {value}")
        if self.clip_steps == 0 and self.candidates_per_sample > 1:
            raise ValueError("candidates_per_sample > 1 needs a CLIP to rank them: set clip_steps > 0")
        if not 0.0 <= self.null_cond_prob < 1.0:
            raise ValueError(f"null_cond_prob must be in [0, 1), got {self.null_cond_prob}")
        if self.cond_scale != 1.0 and self.null_cond_prob == 0.0:
            raise ValueError("cond_scale != 1 needs a model trained with null_cond_prob > 0")


DEFAULT_CONFIG = DemoConfig()
FAST_CONFIG = dataclasses.replace(
    DEFAULT_CONFIG,
    num_train_images=2000,
    vae_steps=600,
    dalle_steps=500,
    dalle_learning_rate=3e-3,
    clip_steps=0,
    candidates_per_sample=1,
    samples_per_prompt=4,
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; anything else as torch reads it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from error


# ---------------------------------------------------------------------------------------------------------
# data and text


@dataclass
class TrainingSet:
    """Rendered training images (n, 3, s, s) in [0, 1] and what each one shows."""

    images: Tensor
    attributes: list[ShapeAttributes]


def render_training_set(config: DemoConfig) -> TrainingSet:
    """The ``'train'`` split (held-out colour x shape pairs excluded), rendered once."""
    dataset = ShapesDataset(config.num_train_images, "train", config.image_size, seed=config.seed)
    samples = [dataset.sample(index) for index in range(len(dataset))]
    return TrainingSet(torch.stack([image for _, image, _ in samples]), [attrs for _, _, attrs in samples])


def build_word_tokenizer(captions: Iterable[str], path: str | Path) -> HugTokenizer:
    """A word-level tokenizer over the words of ``captions`` (lower-cased; punctuation is its own word),
    saved as a Hugging Face ``tokenizers`` JSON file at ``path`` and loaded back as a HugTokenizer.

    Id 0 is ``[PAD]`` and id 1 ``[UNK]`` (any word not seen in ``captions``).
    """
    if isinstance(captions, str):
        raise TypeError("captions must be an iterable of caption strings, not one str")
    normalizer, splitter = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = sorted(
        {word for caption in captions for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption))}
    )
    if not words:
        raise ValueError("captions must hold at least one word")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: index + 2 for index, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizer, splitter
    backend.add_special_tokens(["[PAD]", "[UNK]"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(path))
    return HugTokenizer(path)


def caption_ids(tokenizer: HugTokenizer, attributes: Sequence[ShapeAttributes], text_seq_len: int) -> Tensor:
    """Token ids of every phrasing of every sample's caption: (n, NUM_PHRASINGS, text_seq_len) long."""
    captions = [caption_for(attrs, phrasing) for attrs in attributes for phrasing in range(NUM_PHRASINGS)]
    ids = tokenizer.tokenize(captions, text_seq_len)
    return rearrange(ids, "(n p) l -> n p l", p=NUM_PHRASINGS)


def _longest_caption(tokenizer: HugTokenizer, attributes: Sequence[ShapeAttributes]) -> int:
    return max(len(tokenizer.encode(caption_for(a, p))) for a in set(attributes) for p in range(NUM_PHRASINGS))


# ---------------------------------------------------------------------------------------------------------
# training


def _warmup_cosine(steps: int, warmup_fraction: float = 0.05) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup, then a cosine decay to 0 at ``steps``."""
    warmup = max(1, round(warmup_fraction * steps))
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def _optimise(
    model: nn.Module,
    loss_at: Callable[[int], Tensor],
    steps: int,
    learning_rate: float,
    description: str,
    progress: bool,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> float:
    """Run ``steps`` AdamW steps on ``loss_at(step)`` with warmup + cosine; returns a smoothed final loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.98), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine(steps))
    model.train()
    smoothed = math.nan
    with tqdm(range(steps), desc=description, disable=not progress, leave=True, dynamic_ncols=True) as bar:
        for step in bar:
            loss = loss_at(step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimiser.step()
            schedule.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{description}: the loss became {value} at step {step}")
            smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{smoothed:.4f}")
    model.eval()
    return smoothed


def _batches(num_samples: int, batch_size: int, seed: int) -> Callable[[], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.randint(0, num_samples, (batch_size,), generator=generator)


def train_vae(images: Tensor, config: DemoConfig, progress: bool = True) -> tuple[DiscreteVAE, float]:
    """Train a DiscreteVAE on ``images`` (n, 3, s, s) in [0, 1] (on their device), temperature annealed
    exponentially from 1 to ``config.vae_final_temperature``. Returns it in eval mode and the smoothed final loss."""
    vae = DiscreteVAE(
        image_size=config.image_size, num_layers=config.vae_num_layers, num_tokens=config.vae_num_tokens,
        codebook_dim=config.vae_codebook_dim, hidden_dim=config.vae_hidden_dim,
        kl_div_loss_weight=config.vae_kl_weight,
    ).to(images.device)  # fmt: skip
    next_batch = _batches(len(images), config.vae_batch_size, config.seed)
    steps = config.vae_steps

    def loss_at(step: int) -> Tensor:
        temperature = config.vae_final_temperature ** (step / max(1, steps - 1))
        return vae(images[next_batch().to(images.device)], return_loss=True, temp=temperature)

    final_loss = _optimise(vae, loss_at, steps, config.vae_learning_rate, "VAE", progress, max_grad_norm=None)
    return vae, final_loss


@torch.no_grad()
def encode_images(vae: DiscreteVAE, images: Tensor, batch_size: int = 256) -> Tensor:
    """Image codes (n, fmap * fmap) long, computed once so DALLE training never runs the VAE."""
    return torch.cat([vae.get_codebook_indices(chunk) for chunk in images.split(batch_size)])


def _pick_phrasings(text: Tensor, seed: int) -> Callable[[Tensor], Tensor]:
    """index (b,) -> caption ids (b, text_seq_len), one random phrasing of each sample's caption."""
    generator = torch.Generator().manual_seed(seed)
    return lambda index: text[index, torch.randint(0, text.shape[1], (len(index),), generator=generator)]


def train_dalle(
    vae: DiscreteVAE, codes: Tensor, text: Tensor, num_text_tokens: int, config: DemoConfig, progress: bool = True
) -> tuple[DALLE, float]:
    """Train DALLE on image codes (n, image_seq_len) and caption ids (n, phrasings, text_seq_len), ids below
    ``num_text_tokens``. Each step picks a random phrasing per sample and drops the caption with probability
    ``config.null_cond_prob``, for classifier-free guidance. Returns it in eval mode and the final loss."""
    dalle = DALLE(
        dim=config.dalle_dim, vae=vae, num_text_tokens=num_text_tokens, text_seq_len=text.shape[-1],
        depth=config.dalle_depth, heads=config.dalle_heads, dim_head=config.dalle_dim // config.dalle_heads,
        ff_mult=config.dalle_ff_mult,
    ).to(codes.device)  # fmt: skip
    next_batch, captions = (
        _batches(len(codes), config.dalle_batch_size, config.seed + 1),
        _pick_phrasings(text, config.seed + 2),
    )

    def loss_at(step: int) -> Tensor:
        index = next_batch()
        batch_text, batch_codes = captions(index).to(codes.device), codes[index.to(codes.device)]
        return dalle(batch_text, batch_codes, return_loss=True, null_cond_prob=config.null_cond_prob)

    steps, learning_rate = config.dalle_steps, config.dalle_learning_rate
    return dalle, _optimise(dalle, loss_at, steps, learning_rate, "DALLE", progress, weight_decay=0.01)


def train_clip(
    images: Tensor, text: Tensor, num_text_tokens: int, config: DemoConfig, progress: bool = True
) -> tuple[CLIP, float]:
    """Train a small CLIP on images (n, 3, s, s) and caption ids (n, phrasings, text_seq_len), ids below
    ``num_text_tokens``. Returns it in eval mode and the final loss."""
    clip = CLIP(
        dim_text=config.clip_dim, dim_image=config.clip_dim, dim_latent=config.clip_dim,
        num_text_tokens=num_text_tokens, text_enc_depth=1, text_seq_len=text.shape[-1], text_heads=4,
        visual_enc_depth=2, visual_heads=4, visual_image_size=config.image_size, visual_patch_size=4,
    ).to(images.device)  # fmt: skip
    next_batch, captions = (
        _batches(len(images), config.clip_batch_size, config.seed + 3),
        _pick_phrasings(text, config.seed + 4),
    )

    def loss_at(step: int) -> Tensor:
        index = next_batch()
        return clip(captions(index).to(images.device), images[index.to(images.device)], return_loss=True)

    steps, learning_rate = config.clip_steps, config.clip_learning_rate
    return clip, _optimise(clip, loss_at, steps, learning_rate, "CLIP", progress, weight_decay=0.01)


# ---------------------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate_for_prompts(
    dalle: DALLE,
    tokenizer: HugTokenizer,
    prompts: Sequence[ShapePrompt],
    config: DemoConfig,
    clip: CLIP | None = None,
    batch_size: int = 128,
    progress: bool = True,
) -> Tensor:
    """``config.samples_per_prompt`` images per prompt: (len(prompts), samples, 3, s, s) in [0, 1].

    Every sample draws from its own generator seeded from ``config.seed`` and its position, so results do
    not depend on ``batch_size``. With ``clip`` each sample is the best of ``config.candidates_per_sample`` candidates.
    """
    samples, candidates = config.samples_per_prompt, config.candidates_per_sample
    if candidates > 1 and clip is None:
        raise ValueError("candidates_per_sample > 1 needs a clip to rank the candidates")
    captions = [p.caption for p in prompts for _ in range(samples * candidates)]
    text = tokenizer.tokenize(captions, dalle.text_seq_len).to(dalle.device)
    images, scores = [], []
    chunks = range(0, len(captions), batch_size)
    for start in tqdm(chunks, desc="generating", disable=not progress, dynamic_ncols=True):
        chunk = slice(start, start + batch_size)
        indices = range(start, min(start + batch_size, len(captions)))
        generators = [torch.Generator().manual_seed(config.seed * 1_000_000 + i) for i in indices]
        out = dalle.generate_images(
            text[chunk], filter_thres=config.filter_thres, temperature=config.temperature,
            cond_scale=config.cond_scale, generator=generators,
        ).clamp(0.0, 1.0)  # fmt: skip
        if clip is not None:  # scored after clamping: CLIP was trained on images in [0, 1]
            scores.append(clip(text[chunk].to(out.device), out))
        images.append(out)
    images = rearrange(torch.cat(images), "(p k c) ch h w -> p k c ch h w", p=len(prompts), k=samples)
    if clip is None:
        return images[:, :, 0]
    best = rearrange(torch.cat(scores), "(p k c) -> p k c", p=len(prompts), k=samples).argmax(dim=-1)
    return images[torch.arange(len(prompts))[:, None], torch.arange(samples)[None, :], best]


# ---------------------------------------------------------------------------------------------------------
# the whole pipeline


def _judge_reconstructions(vae: DiscreteVAE, classifier, config: DemoConfig, count: int = 280) -> tuple[dict, Tensor]:
    """Fidelity of VAE reconstructions of unseen ground truth of every pair: the ceiling for generation.
    Returns the judge's ``overall`` rates and (2, count, 3, s, s): the ground truth and its reconstructions."""
    dataset = ShapesDataset(count, "all", config.image_size, seed=config.seed + 1)
    held = set(heldout_pairs())
    samples = [dataset.sample(index) for index in range(count)]
    images = torch.stack([image for _, image, _ in samples])
    prompts = [ShapePrompt(caption, attrs, (attrs.colour, attrs.shape) in held) for caption, _, attrs in samples]
    with torch.no_grad():
        device = next(vae.parameters()).device
        reconstructions = vae.decode(encode_images(vae, images.to(device))).clamp(0, 1).cpu()
    overall = evaluate_fidelity(reconstructions, prompts, classifier)["overall"]
    return overall, torch.stack([images, reconstructions])


def run_demo(
    config: DemoConfig = DEFAULT_CONFIG,
    out_dir: str | Path = "outputs/demo",
    device: str | torch.device = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train everything from scratch, generate for every colour x shape prompt and judge the samples.

    Writes into ``out_dir``: ``grid.png`` (labelled samples and VAE reconstructions), ``report.json`` (the
    returned dict), ``tokenizer.json`` and the trained models as ``vae/``, ``dalle/`` (and ``clip/``) via
    ``save_pretrained``. The global torch RNG of the caller is left as it was.
    """
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a DemoConfig, got {type(config).__name__}")
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stopwatch, losses = Stopwatch(), {}
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        with stopwatch("data"):
            data = render_training_set(config)
            kinds = set(data.attributes)
            tokenizer = build_word_tokenizer(
                (caption_for(a, p) for a in kinds for p in range(NUM_PHRASINGS)), out_dir / "tokenizer.json"
            )
            text = caption_ids(tokenizer, data.attributes, _longest_caption(tokenizer, kinds))
            images = data.images.to(device)
        log(f"{len(images)} training images, {len(kinds)} kinds of sample; held-out pairs: "
            + ", ".join(f"{c} {s}" for c, s in heldout_pairs()))  # fmt: skip
        with stopwatch("vae"):
            vae, losses["vae"] = train_vae(images, config, progress)
            codes = encode_images(vae, images)
        with stopwatch("dalle"):
            dalle, losses["dalle"] = train_dalle(vae, codes, text, tokenizer.vocab_size, config, progress)
        clip = None
        if config.clip_steps > 0:
            with stopwatch("clip"):
                clip, losses["clip"] = train_clip(images, text, tokenizer.vocab_size, config, progress)
        with stopwatch("judge"):
            classifier, accuracy = train_shape_classifier(config.image_size, config.seed, config.classifier_steps)
        with stopwatch("generation"):
            prompts = evaluation_prompts()
            samples = generate_for_prompts(dalle, tokenizer, prompts, config, clip, progress=progress).cpu()
        with stopwatch("evaluation"):
            k = config.samples_per_prompt
            fidelity = evaluate_fidelity(
                rearrange(samples, "p k c h w -> (p k) c h w"), [p for p in prompts for _ in range(k)], classifier
            )
            reconstruction, reconstructions = _judge_reconstructions(vae, classifier, config)

    for name, model in (("dalle", dalle), ("vae", vae), ("clip", clip)):
        if model is not None:
            model.save_pretrained(out_dir / name)
    return write_grid_and_report(
        out_dir, config=config, device=device, stopwatch=stopwatch, final_losses=losses,
        shape_classifier_accuracy=accuracy, prompts=prompts, samples=samples, fidelity=fidelity,
        vae_reconstruction=reconstruction, reconstructions=reconstructions,
    )  # fmt: skip
