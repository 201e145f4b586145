#!/usr/bin/env python
"""ptb recipe, stage 'train' (settings from the environment; see README.md here, or --help)."""
from gpam_fairseq.recipes.stages import main

main("ptb", "train")
