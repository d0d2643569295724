"""Datasets: image-caption folders, WebDataset shards, the built-in shapes dataset, image files in and out."""
