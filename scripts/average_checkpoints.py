#!/usr/bin/env python
"""Average the parameters of several fairseq checkpoints (fairseq-fixed ships no such script).

Same interface as fairseq's scripts/average_checkpoints.py (``--help``), and like it this module
exports ``average_checkpoints(paths) -> state``. The command line and the averaging:
gpam_fairseq/checkpointing/averaging.py.
"""

from gpam_fairseq.checkpointing.averaging import average_checkpoints, main  # noqa: F401  (fairseq's script exports it)

if __name__ == "__main__":
    main()
