"""The demo: train every model on the built-in shapes dataset, generate, judge and report."""
