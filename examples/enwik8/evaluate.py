#!/usr/bin/env python
"""enwik8 recipe, stage 'evaluate' (settings from the environment; see README.md here, or --help)."""
from gpam_fairseq.recipes.stages import main

main("enwik8", "evaluate")
