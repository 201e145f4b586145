#!/usr/bin/env python
"""iwslt14 recipe, stage 'evaluate' (settings from the environment; see README.md here, or --help)."""
from gpam_fairseq.recipes.stages import main

main("iwslt14", "evaluate")
