"""``python -m gpam_fairseq.recipes.sweep ...``: the sweep's command line, and ``run-cell SPEC``, the worker
process of ``--parallel``."""
import sys

from gpam_fairseq.recipes.sweep.cli import main

sys.exit(main())
