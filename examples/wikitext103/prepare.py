#!/usr/bin/env python
"""wikitext103 recipe, stage 'prepare' (settings from the environment; see README.md here, or --help)."""
from gpam_fairseq.recipes.stages import main

main("wikitext103", "prepare")
