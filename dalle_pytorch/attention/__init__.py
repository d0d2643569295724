"""Attention over `[text | image grid]`: the attention layer and the patterns that say which keys a query sees."""
