"""Cost of the daGPAM tensorboard scalars: training words/s with --gpam-stats-interval 0 / 10 / 1.

The measurement and its command line (``--help``): gpam_fairseq/measurement/stats_cost.py.
"""
from gpam_fairseq.measurement.stats_cost import main

if __name__ == "__main__":
    main()
