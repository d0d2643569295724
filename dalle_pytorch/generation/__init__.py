"""Ways to draw images from text that are not a model's own sampling method."""

from dalle_pytorch.generation.clip_guided import ClipGuidedResult, clip_guided_generate

__all__ = ["ClipGuidedResult", "clip_guided_generate"]
