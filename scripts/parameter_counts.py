#!/usr/bin/env python
"""Parameter counts of every recipe's MODEL=baseline, baseline_maps, baseline_params and gpam.

The counts, the command line and its examples (``--help``): gpam_fairseq/recipes/parameter_counts.py.
"""
from gpam_fairseq.recipes.parameter_counts import main

if __name__ == "__main__":
    main()
