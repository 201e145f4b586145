#!/usr/bin/env python
"""Rank collapse and gradient diagnostics per layer, for one or several attention types.

The metrics, the command line and its examples (``--help``): gpam_fairseq/measurement/collapse/cli.py (the
measurement itself: the other modules of gpam_fairseq/measurement/collapse/).
"""
from gpam_fairseq.measurement.collapse.cli import main

if __name__ == "__main__":
    main()
