"""The models: DALLE, CLIP, DiscreteVAE, and the transformer they are built from."""
