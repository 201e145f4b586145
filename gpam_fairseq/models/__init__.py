"""The fairseq models and their architectures (fairseq imports every module here for --user-dir)."""
