"""Compatibility: the original project imported the folder dataset as `dalle_pytorch.loader.TextImageDataset`."""

from dalle_pytorch.data import TextImageDataset

__all__ = ["TextImageDataset"]
