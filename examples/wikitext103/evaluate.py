#!/usr/bin/env python
"""wikitext103 recipe, stage 'evaluate' (settings from the environment; see README.md here, or --help)."""
from gpam_fairseq.recipes.stages import main

main("wikitext103", "evaluate")
