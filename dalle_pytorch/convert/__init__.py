"""Converters from other checkpoint formats (the original DALLE-pytorch scripts) to model folders."""
