#!/usr/bin/env python
"""wmt14_en_de recipe, stage 'preprocess' (settings from the environment; see README.md here, or --help)."""
from gpam_fairseq.recipes.stages import main

main("wmt14_en_de", "preprocess")
