#!/usr/bin/env python
"""One comparison table of recipe runs, with significance against the baseline.

The statistics, the command line and its examples (``--help``): gpam_fairseq/recipes/compare.py.
"""
from gpam_fairseq.recipes.compare import main

if __name__ == "__main__":
    main()
