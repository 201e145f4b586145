#!/usr/bin/env python
"""own_corpus recipe, stage 'evaluate' (settings from the environment: TASK, SRC, TGT, SIZE, MODEL, SEED, DATA_DIR...; see README.md here, or --help)."""
from gpam_fairseq.recipes.stages import main

main("own_corpus", "evaluate")
