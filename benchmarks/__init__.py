"""Benchmarks of dalle_pytorch: ``python benchmarks/run.py [--quick] [--only NAME] [--out FILE]``."""
