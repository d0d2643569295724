"""Benchmarks of dalle_pytorch (issue 5): ``python benchmarks/run.py [--quick] [--only NAME] [--out FILE]``."""
