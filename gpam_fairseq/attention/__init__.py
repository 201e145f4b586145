"""The attention: daGPAM's reference math, masks, the fused fast path, the alternatives, the mechanism
registry and the fairseq MultiheadAttention drop-in (no fairseq outside multihead.py and stats.py)."""
