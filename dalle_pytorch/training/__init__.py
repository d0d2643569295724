"""The training loop, exact resume, distributed engines and run logging."""
