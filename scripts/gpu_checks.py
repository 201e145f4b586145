#!/usr/bin/env python
"""The GPU checks of training on a GPU (distributed, fp16, autocast), in one command, with a PASS/FAIL table.

The checks, the command line and its examples (``--help``): gpam_fairseq/measurement/gpu_checks.py.
"""
import sys

from gpam_fairseq.measurement.gpu_checks import main

if __name__ == "__main__":
    sys.exit(main())
