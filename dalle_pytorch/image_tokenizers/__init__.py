"""Released image tokenizers: OpenAI's discrete VAE and VQGAN, read without running code from their files."""
