"""Files in and out: atomic writes, the `save_pretrained` checkpoint format, the restricted unpickler for
`torch.save` files, and verified downloads. Imports nothing else from the package."""
