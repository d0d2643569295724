"""Text tokenizers (CLIP BPE, Hugging Face, YouTokenToMe, Chinese) and training a tokenizer on captions."""
