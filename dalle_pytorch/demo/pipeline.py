"""The demo pipeline: train DALL-E from scratch on the built-in shapes dataset and measure what it learnt.

    render shapes -> word tokenizer -> DiscreteVAE -> image codes (computed once) -> DALLE -> (CLIP)
    -> generate for every colour x shape prompt, held-out pairs included -> judge -> grid.png, report.json

Each step is a function that works on its own; :func:`run_demo` chains them and ``dalle-demo`` runs it.
The grid and the report are drawn up by ``dalle_pytorch.demo.report``.

- DALL-E (Ramesh et al. 2021, https://arxiv.org/abs/2102.12092): a discrete VAE turns images into tokens
  and a transformer learns [text | image tokens]. As in the paper, the VAE's temperature is annealed
  towards 1/16; a small KL-to-uniform weight keeps many codes in use (without it a VAE this small tends to
  collapse onto a handful of codes and loses colours).
- Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598): the caption is dropped
  from a fraction of training samples (``null_cond_prob``) so that sampling can push the text-conditioned
  logits away from the unconditioned ones (``cond_scale``). This mostly helps the held-out pairs.
- CLIP reranking (Radford et al. 2021, https://arxiv.org/abs/2103.00020), optional: generate several
  candidates per sample and keep the one a small CLIP scores highest.
- The judge (``dalle_pytorch.demo.judge``): colour from pixels, shape from a classifier trained on ground truth.

Captions are tokenized word by word: the dataset's vocabulary is some 25 words, and one token per word makes
"red" and "circle" single symbols the transformer can recombine for the held-out pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import Tensor
from tqdm.auto import tqdm

from dalle_pytorch.data.shapes import (
    NUM_PHRASINGS,
    ShapeAttributes,
    ShapePrompt,
    ShapesDataset,
    caption_for,
    evaluation_prompts,
    heldout_pairs,
)
from dalle_pytorch.demo.clip_guided import clip_guided_for_prompts, clip_guided_grid_rows
from dalle_pytorch.demo.comparison import write_comparison
from dalle_pytorch.demo.config import DEFAULT_CONFIG, FAST_CONFIG, DemoConfig
from dalle_pytorch.demo.dalle2 import run_dalle2
from dalle_pytorch.demo.judge import evaluate_fidelity, judge_samples, train_shape_classifier
from dalle_pytorch.demo.report import Stopwatch, grid_rows, make_grid, write_grid_and_report
from dalle_pytorch.demo.training import encode_images, train_clip, train_dalle, train_vae
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.models.dalle import DALLE
from dalle_pytorch.models.vae import DiscreteVAE
from dalle_pytorch.text.tokenizer import HugTokenizer

__all__ = [
    "DEFAULT_CONFIG",
    "FAST_CONFIG",
    "MODELS",
    "DemoConfig",
    "TrainingSet",
    "build_word_tokenizer",
    "caption_ids",
    "generate_for_prompts",
    "judge_decode_precisions",
    "make_grid",
    "render_training_set",
    "resolve_device",
    "run_demo",
    "train_clip",
    "train_dalle",
    "train_vae",
]


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


PRECISION_MAX_DROP_POINTS = 3.0  # lower-precision decoding keeps the fp32 fidelity within this many points


def judge_decode_precisions(
    dalle: DALLE,
    tokenizer: HugTokenizer,
    prompts: Sequence[ShapePrompt],
    config: DemoConfig,
    clip: CLIP | None,
    classifier,
    fp32_samples: Tensor,
    fp32_fidelity: dict,
    stopwatch: Stopwatch,
    progress: bool = True,
) -> dict:
    """Generate and judge again with each of ``config.decode_precisions`` (``DALLE.decoding_copy``), the same
    seeds as the fp32 samples ``fp32_samples`` judged ``fp32_fidelity`` (reused for ``"fp32"``).

    Per precision: the ``both_match`` rates (seen, heldout, overall), their difference to fp32 in points,
    the fraction of samples identical to fp32's and the generation seconds. ``met``: no overall rate drops
    more than :data:`PRECISION_MAX_DROP_POINTS` points below fp32's. ``noise``: the same for fp32 with other
    sampling seeds, the difference that sampling alone makes (a low-precision model samples other codes as
    soon as a near-tie flips, after which its samples are as different from fp32's as other seeds' are).
    """
    groups = ("seen", "heldout", "overall")

    def judged(samples: Tensor, fidelity: dict, stage: str) -> dict:
        return {
            "both_match": {group: fidelity[group]["both_match"] for group in groups},
            "points_vs_fp32": {
                group: 100 * (fidelity[group]["both_match"] - fp32_fidelity[group]["both_match"]) for group in groups
            },
            "identical_to_fp32": float((samples == fp32_samples).flatten(2).all(-1).float().mean()),
            "generation_seconds": stopwatch.wall.get(stage),
        }

    def generated(model: DALLE, stage: str, run_config: DemoConfig) -> tuple[Tensor, dict]:
        with stopwatch(stage):
            samples = generate_for_prompts(model, tokenizer, prompts, run_config, clip, progress=progress).cpu()
        return samples, judge_samples(samples, prompts, classifier)

    per_precision = {}
    for name in config.decode_precisions:
        samples, fidelity, stage = fp32_samples, fp32_fidelity, "generation"
        if name != "fp32":
            stage = f"generation_{name}"
            samples, fidelity = generated(dalle.decoding_copy(name), stage, config)
        per_precision[name] = judged(samples, fidelity, stage)
    reseeded = dataclasses.replace(config, seed=config.seed + 1)
    noise = judged(*generated(dalle, "generation_fp32_other_seeds", reseeded), "generation_fp32_other_seeds")
    drops = [-result["points_vs_fp32"]["overall"] for result in per_precision.values()]
    met = all(drop <= PRECISION_MAX_DROP_POINTS for drop in drops)
    return {"precisions": per_precision, "noise": noise, "max_drop_points": PRECISION_MAX_DROP_POINTS, "met": met}


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


MODELS = ("dalle", "dalle2", "both")


def run_demo(
    config: DemoConfig = DEFAULT_CONFIG,
    out_dir: str | Path = "outputs/demo",
    device: str | torch.device = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    model: str = "dalle",
) -> dict:
    """Train everything from scratch, generate for every colour x shape prompt and judge the samples.

    ``model``: "dalle" (the VAE and DALLE), "dalle2" (the VAE, CLIP, the diffusion prior and a decoder in the
    VAE's latents) or "both" (all of them, and CLIP-guided optimisation of the VAE's codes, judged side by side).

    Writes into ``out_dir``: ``grid.png`` (labelled samples and VAE reconstructions), ``report.json`` (the
    returned dict), ``tokenizer.json``, the trained models as ``vae/``, ``dalle/``, ``clip/``, ``dalle2/`` via
    ``save_pretrained``, and each model's training metrics as ``training/<model>/metrics.jsonl``. The global
    torch RNG of the caller is left as it was.
    """
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a DemoConfig, got {type(config).__name__}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if config.decode_precisions and model != "dalle":
        raise ValueError(f"decode_precisions are judged with model='dalle', got model={model!r}")
    uses_dalle, uses_dalle2 = model in ("dalle", "both"), model in ("dalle2", "both")
    clip_steps = config.clip_steps if not uses_dalle2 else max(config.clip_steps, config.dalle2_clip_steps)
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stopwatch, losses, models, results = Stopwatch(), {}, {}, {}
    vae = dalle = None
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
        if uses_dalle or (uses_dalle2 and config.dalle2_latent_decoder):  # a latent decoder diffuses in its grid
            with stopwatch("vae"):
                vae, losses["vae"] = train_vae(images, config, progress, out_dir / "training" / "vae")
            models["vae"] = vae
        if uses_dalle:
            with stopwatch("dalle"):
                codes = encode_images(vae, images)
                dalle, losses["dalle"] = train_dalle(
                    vae, codes, text, tokenizer.vocab_size, config, progress, out_dir / "training" / "dalle"
                )
            models["dalle"] = dalle
        clip = None
        if clip_steps > 0:
            with stopwatch("clip"):
                clip, losses["clip"] = train_clip(
                    images, text, tokenizer.vocab_size, dataclasses.replace(config, clip_steps=clip_steps), progress,
                    out_dir / "training" / "clip",
                )  # fmt: skip
            models["clip"] = clip
        with stopwatch("judge"):
            classifier, accuracy = train_shape_classifier(config.image_size, config.seed, config.classifier_steps)
        prompts = evaluation_prompts()
        rows: list[tuple[str, Tensor | None]] = []
        if uses_dalle:
            with stopwatch("generation"):
                reranker = clip if config.clip_steps > 0 else None
                samples = generate_for_prompts(dalle, tokenizer, prompts, config, reranker, progress=progress).cpu()
            with stopwatch("evaluation"):
                results["dalle"] = judge_samples(samples, prompts, classifier)
                reconstruction, reconstructions = _judge_reconstructions(vae, classifier, config)
            precisions = None
            if config.decode_precisions:
                precisions = judge_decode_precisions(dalle, tokenizer, prompts, config, reranker, classifier, samples,
                                                     results["dalle"], stopwatch, progress)  # fmt: skip
            rows += grid_rows(prompts, samples, results["dalle"], reconstructions)
        if uses_dalle2:
            ids = tokenizer.tokenize([p.caption for p in prompts], text.shape[-1])
            models["dalle2"], results["dalle2"], dalle2_losses, dalle2_rows = run_dalle2(
                clip, images, text, ids, prompts, classifier, config, stopwatch, progress, out_dir / "training", vae
            )
            losses.update(dalle2_losses)
            rows += dalle2_rows
        if model == "both":
            with stopwatch("clip_guided"):
                guided = clip_guided_for_prompts(vae, clip, ids, config)
            results["clip_guided"] = judge_samples(guided, prompts, classifier)
            rows += clip_guided_grid_rows(prompts, guided, results["clip_guided"])

    for name, trained in models.items():
        trained.save_pretrained(out_dir / name)
    if model == "dalle":
        return write_grid_and_report(
            out_dir, config=config, device=device, stopwatch=stopwatch, final_losses=losses,
            shape_classifier_accuracy=accuracy, prompts=prompts, samples=samples, fidelity=results["dalle"],
            vae_reconstruction=reconstruction, reconstructions=reconstructions, decode_precision=precisions,
        )  # fmt: skip
    return write_comparison(
        out_dir, rows, model=model, config=config, device=device, stopwatch=stopwatch, final_losses=losses,
        shape_classifier_accuracy=accuracy, results=results,
        vae_reconstruction=reconstruction if uses_dalle else None,
    )  # fmt: skip

