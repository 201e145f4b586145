#!/usr/bin/env python
"""λ sweeps: a grid of daGPAM settings × seeds for one recipe, with its baselines, through the
recipe's own train and evaluate stages (gpam_fairseq/recipes/sweep/; --help for the options)."""
import sys

from gpam_fairseq.recipes.sweep import main

if __name__ == "__main__":
    main(sys.argv[1:])
