#!/usr/bin/env python
"""Rank collapse and gradient diagnostics per layer, for one or several attention types.

The metrics, the command line and its examples (``--help``): gpam_fairseq/measurement/collapse.py.
"""
from gpam_fairseq.measurement.collapse import main

if __name__ == "__main__":
    main()
