#!/usr/bin/env python
"""Kernels, saved bytes, speed and memory of every attention we ship, next to stock fairseq.

The levels, the command line and its examples (``--help``): gpam_fairseq/measurement/benchmark/cli.py (the
measurement itself: the other modules of gpam_fairseq/measurement/benchmark/).
"""
from gpam_fairseq.measurement.benchmark.cli import main

if __name__ == "__main__":
    main()
