#!/usr/bin/env python
"""Kernels, saved bytes, speed and memory of every attention we ship, next to stock fairseq.

The levels, the command line and its examples (``--help``): gpam_fairseq/measurement/benchmark.py.
"""
from gpam_fairseq.measurement.benchmark import main

if __name__ == "__main__":
    main()
