"""The demo's settings: every knob in one frozen dataclass, with the default and the `--fast` budgets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dalle_pytorch.models.precision import DECODING_PRECISIONS
from dalle_pytorch.training.settings import PRECISIONS

__all__ = ["DEFAULT_CONFIG", "FAST_CONFIG", "DemoConfig"]


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
    # DALLE2 (--model dalle2 or both): CLIP (trained for max(clip_steps, dalle2_clip_steps) steps), a diffusion
    # prior on its embeddings and one U-Net decoder making image_size images
    dalle2_clip_steps: int = 1500
    dalle2_prior_dim: int = 128
    dalle2_prior_depth: int = 3
    dalle2_prior_steps: int = 1500
    dalle2_prior_learning_rate: float = 1e-3
    # the decoder's U-Net diffuses in the DiscreteVAE's latent grid (the codebook vector of each cell's code, 8x8 x
    # vae_codebook_dim; the VAE is trained for it, or shared with DALLE) instead of 32x32 pixels
    dalle2_latent_decoder: bool = True
    dalle2_unet_dim: int = 32
    dalle2_unet_mults: tuple[int, ...] = (1, 2)
    dalle2_predict_x0: bool = True
    # the decoder also reads the caption's CLIP text encodings (as unCLIP's and GLIDE's do), dropped with this
    # probability in training for guidance
    dalle2_decoder_reads_text: bool = True
    dalle2_decoder_text_drop_prob: float = 0.5
    dalle2_decoder_steps: int = 4000
    dalle2_decoder_learning_rate: float = 2e-3
    dalle2_decoder_batch_size: int = 32
    dalle2_batch_size: int = 32
    dalle2_timesteps: int = 1000
    dalle2_sample_steps: int = 25
    dalle2_cond_scale: float = 2.0
    dalle2_prior_cond_scale: float = 1.0
    # CLIP-guided optimisation of the VAE's codes (--model both): images per prompt, Adam steps per image
    clip_guided_samples: int = 4
    clip_guided_steps: int = 60
    clip_guided_learning_rate: float = 0.2
    # the judge's shape classifier
    classifier_steps: int = 150
    # generation
    samples_per_prompt: int = 8
    candidates_per_sample: int = 4
    cond_scale: float = 1.5
    temperature: float = 0.7
    filter_thres: float = 0.5
    seed: int = 0
    # after generating with the trained model (fp32 weights), generate and judge again with each of these decoding
    # precisions ("fp32", "bf16", "int8"; DALLE.decoding_copy), reported side by side
    decode_precisions: tuple[str, ...] = ()
    # training precision of every model the demo trains (the judge's classifier excepted): "fp32", or "bf16" /
    # "fp16" autocast, as the Trainer's precision
    precision: str = "fp32"

    def __post_init__(self) -> None:
        # report.json stores the tuple as a list; read back, it is a tuple again
        object.__setattr__(self, "dalle2_unet_mults", tuple(self.dalle2_unet_mults))
        if isinstance(self.decode_precisions, str):
            raise TypeError(f"decode_precisions must be a tuple of names, got the str {self.decode_precisions!r}")
        object.__setattr__(self, "decode_precisions", tuple(self.decode_precisions))
        names = self.decode_precisions
        if any(name not in DECODING_PRECISIONS for name in names) or len(set(names)) != len(names):
            raise ValueError(f"decode_precisions must be distinct names out of {DECODING_PRECISIONS}, got {names}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{field.name} must be an int, got {value!r}")
            minimum = 0 if field.name in ("clip_steps", "seed") else 1
            if field.type == "int" and value < minimum:
                raise ValueError(f"{field.name} must be >= {minimum}, got {value}")
        if self.clip_steps == 0 and self.candidates_per_sample > 1:
            raise ValueError("candidates_per_sample > 1 needs a CLIP to rank them: set clip_steps > 0")
        for name in ("null_cond_prob", "dalle2_decoder_text_drop_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.cond_scale != 1.0 and self.null_cond_prob == 0.0:
            raise ValueError("cond_scale != 1 needs a model trained with null_cond_prob > 0")


DEFAULT_CONFIG = DemoConfig()
FAST_CONFIG = dataclasses.replace(
    DEFAULT_CONFIG,
    num_train_images=2000,
    vae_steps=900,
    dalle_steps=500,
    dalle_learning_rate=3e-3,
    clip_steps=0,
    candidates_per_sample=1,
    samples_per_prompt=4,
    dalle2_clip_steps=1000,
    dalle2_prior_steps=800,
    dalle2_decoder_steps=2600,
    clip_guided_steps=40,
)
