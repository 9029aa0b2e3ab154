"""Stage 1: run the instruct model over a token stream and write residual activations to the cache."""
