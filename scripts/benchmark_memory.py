#!/usr/bin/env python
"""The memory ledger: what one training step keeps for the backward pass, by role, stock beside daGPAM.

The pairs, the roles and the command line (``--help``): gpam_fairseq/measurement/memory_ledger.py.
"""
from gpam_fairseq.measurement.memory_ledger import main

if __name__ == "__main__":
    main()
