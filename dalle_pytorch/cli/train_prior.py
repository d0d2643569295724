"""`dalle2-train-prior`: train DALL-E 2's diffusion prior (text embedding -> CLIP image embedding).

    dalle2-train-prior --embeddings ./embeddings --clip-path ./clip --output-dir ./prior
    dalle2-train-prior --image-text-folder ./data --clip-path ./clip --dim 512 --depth 6 --ema-decay 0.9999

From precomputed embeddings (`dalle2-embed`) the CLIP is never run; --clip-path is then optional and only
stored inside the saved prior, so that `dalle2-generate` can encode prompts. From an image-text folder the
frozen CLIP embeds every batch. The prior conditions on CLIP's per-token text encodings when the data has
them (an image-text folder always; embeddings made with `dalle2-embed --text-encodings`).

Training runs on the library's `Trainer`: moving average of the weights (--ema-decay, saved as `ema/` in
each checkpoint), gradient accumulation, clipping, bf16/fp16 autocast with the NaN guard, warm-up and
cosine schedules, exact resume and torchrun DDP. Ramesh et al. 2022, https://arxiv.org/abs/2204.06125.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from dalle_pytorch.cli.common import add_tokenizer_args, choose_seed, fit, resume_dir, run_main, seed_everything
from dalle_pytorch.cli.dalle2_options import add_config_arg, load_clip, parse_with_config
from dalle_pytorch.cli.flags import add_arg, add_switch, add_training_args
from dalle_pytorch.cli.runs import settle_output_dir
from dalle_pytorch.data.embeddings import ClipEmbeddingsDataset
from dalle_pytorch.data.text_image import TextImageDataset
from dalle_pytorch.diffusion.clip_adapter import as_clip_adapter
from dalle_pytorch.diffusion.prior import DiffusionPrior, DiffusionPriorNetwork
from dalle_pytorch.training.data_order import IndexedBatches
from dalle_pytorch.training.distributed import init_distributed, shutdown_distributed
from dalle_pytorch.training.trainer import TrainResult

PROG = "dalle2-train-prior"
MODEL_FLAGS = {
    "dim", "depth", "heads", "dim_head", "ff_mult", "attn_dropout", "ff_dropout", "timesteps", "sample_timesteps",
    "cond_drop_prob", "beta_schedule", "text_encodings",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train DALL-E 2's diffusion prior on CLIP embeddings.")
    data = parser.add_argument_group("data (one of)")
    add_arg(data, "--embeddings", default=None, help="a dalle2-embed output folder (the CLIP is not run)")
    add_arg(data, "--image_text_folder", default=None, help="images with same-named .txt captions (needs --clip_path)")
    add_arg(data, "--truncate_captions", action="store_true", help="cut captions longer than the CLIP's text length")
    add_arg(
        parser,
        "--clip_path",
        default=None,
        help="a CLIP model folder or dalle-train-clip output folder, stored inside the prior (and run on "
        "--image_text_folder)",
    )
    add_tokenizer_args(parser)

    model = parser.add_argument_group("model (ignored when resuming: the checkpoint has them)")
    add_config_arg(model)
    add_arg(model, "--dim", type=int, default=512, help="transformer width (default: 512)")
    add_arg(model, "--depth", type=int, default=6, help="transformer layers (default: 6)")
    add_arg(model, "--heads", type=int, default=8, help="attention heads (default: 8)")
    add_arg(model, "--dim_head", type=int, default=64, help="width of each head (default: 64)")
    add_arg(model, "--ff_mult", type=int, default=4, help="feed-forward width = ff_mult * dim (default: 4)")
    add_arg(model, "--attn_dropout", type=float, default=0.0, help="attention dropout (default: 0)")
    add_arg(model, "--ff_dropout", type=float, default=0.0, help="feed-forward dropout (default: 0)")
    add_arg(model, "--timesteps", type=int, default=1000, help="length of the noise schedule (default: 1000)")
    add_arg(model, "--sample_timesteps", type=int, default=None, help="default DDIM steps for sampling (default: DDPM)")
    add_arg(model, "--cond_drop_prob", type=float, default=0.2, help="caption drop rate, for guidance (default: 0.2)")
    add_arg(model, "--beta_schedule", choices=("cosine", "linear"), default="cosine", help="noise schedule")
    add_switch(
        model,
        "--text_encodings",
        True,
        "condition on CLIP's per-token text encodings when the data has them",
    )
    add_training_args(parser, output_dir="prior", epochs=20, batch_size=64, learning_rate=1.1e-4)
    return parser


def build_prior(args: argparse.Namespace, clip: Any, embed_dim: int, encoding_dim: int | None) -> DiffusionPrior:
    """A new prior; `encoding_dim` None: no text encodings to condition on."""
    net = DiffusionPriorNetwork(
        dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head, ff_mult=args.ff_mult,
        image_embed_dim=embed_dim, text_encoding_dim=encoding_dim, attn_dropout=args.attn_dropout,
        ff_dropout=args.ff_dropout,
    )  # fmt: skip
    return DiffusionPrior(
        net, clip, image_embed_dim=embed_dim, timesteps=args.timesteps, sample_timesteps=args.sample_timesteps,
        cond_drop_prob=args.cond_drop_prob, beta_schedule=args.beta_schedule,
        condition_on_text_encodings=encoding_dim is not None,
    )  # fmt: skip


def prior_loss(model: nn.Module, batch: Any, step: int) -> torch.Tensor:
    """The prior's diffusion loss for a batch of embeddings (a dict) or of (token ids, images)."""
    if isinstance(batch, dict):
        return model(
            text_embed=batch["text_embed"], image_embed=batch["image_embed"],
            text_encodings=batch.get("text_encodings"), text_mask=batch.get("text_mask"),
        )  # fmt: skip
    text, images = batch
    return model(text, images)


def run(argv: list[str] | None = None) -> TrainResult:
    """Parses `argv`, trains, and returns the result (the console script is `main`)."""
    parser = build_parser()
    args = parse_with_config(parser, argv, MODEL_FLAGS)
    if (args.embeddings is None) == (args.image_text_folder is None):
        parser.error("give the training data with --embeddings or --image_text_folder (one of them)")
    if args.image_text_folder is not None and args.clip_path is None:
        parser.error("--image_text_folder needs --clip_path (the CLIP that embeds the images and captions)")
    ctx = init_distributed(args.device)
    try:
        start = resume_dir(args, expect="DiffusionPrior")
        settle_output_dir(args, PROG, start)
        seed = choose_seed(args, start)
        seed_everything(seed)
        clip, tokenizer, spec = load_clip(args) if args.clip_path is not None else (None, None, None)
        if args.embeddings is not None:
            dataset: Any = ClipEmbeddingsDataset(args.embeddings)
            embed_dim = dataset.dim
            stored = dataset.index.get("text_encodings")
            encoding_dim = dataset[0]["text_encodings"].shape[-1] if stored and args.text_encodings else None
            if clip is not None and as_clip_adapter(clip).dim_latent != embed_dim:
                raise ValueError(
                    f"--embeddings have width {embed_dim}, the CLIP of --clip_path {as_clip_adapter(clip).dim_latent}"
                )
        else:
            dataset = TextImageDataset(
                args.image_text_folder, text_len=clip.text_seq_len, image_size=clip.image_size, tokenizer=tokenizer,
                truncate_captions=args.truncate_captions, transparent=clip.channels == 4,
            )  # fmt: skip
            dataset.check()
            adapter = as_clip_adapter(clip)
            embed_dim = adapter.dim_latent
            encoding_dim = adapter.text_encoding_dim if args.text_encodings else None
        prior = DiffusionPrior.from_pretrained(start) if start is not None else build_prior(
            args, clip, embed_dim, encoding_dim
        )  # fmt: skip
        if start is not None and encoding_dim is None and prior.condition_on_text_encodings:
            raise ValueError("the resumed prior conditions on text encodings, but the data has none")
        data = IndexedBatches(dataset, batch_size=args.batch_size, seed=seed, ctx=ctx, num_workers=args.num_workers)
        return fit(
            PROG, args, prior, data, prior_loss, ctx, seed=seed, on_sample=None, resume_from=start, tokenizer=spec,
        )  # fmt: skip
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
