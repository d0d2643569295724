"""Compatibility: the original project's `dalle_pytorch.dalle_pytorch` module held the models.

Its public classes are here under their old names; its small helpers (`exists`, `top_k`, ...) were
internals and are gone: the error says where their job is done now.
"""

from typing import Any

from dalle_pytorch.image_tokenizers.pretrained_vae import OpenAIDiscreteVAE, VQGanVAE
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.models.dalle import DALLE
from dalle_pytorch.models.vae import DiscreteVAE

__all__ = ["CLIP", "DALLE", "DiscreteVAE", "OpenAIDiscreteVAE", "VQGanVAE"]


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"dalle_pytorch.dalle_pytorch.{name} was an internal helper of the original project and is not kept; "
        "this module keeps CLIP, DALLE, DiscreteVAE, OpenAIDiscreteVAE and VQGanVAE (also importable from "
        "dalle_pytorch); sampling helpers live in dalle_pytorch.models.sampling"
    )
