"""Compatibility: the original project imported the folder dataset as `dalle_pytorch.loader.TextImageDataset`."""

from dalle_pytorch.data.text_image import TextImageDataset

__all__ = ["TextImageDataset"]
