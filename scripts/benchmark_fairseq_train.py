#!/usr/bin/env python
"""Words/s of real ``fairseq-train`` runs, each stock architecture against its daGPAM twin.

The measurement, the command line and its examples (``--help``): gpam_fairseq/measurement/benchmark_fairseq_train.py.
"""
import sys

from gpam_fairseq.measurement.benchmark_fairseq_train import command_line

if __name__ == "__main__":
    command_line(sys.argv[1:])
