"""fairseq's Transformer encoder/decoder layers and stacks with the attention swapped."""
