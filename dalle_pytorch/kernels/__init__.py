"""Optional fast CPU paths for attention (block-sparse tiles, chunked dropout), each tested equal to dense attention."""
