#!/usr/bin/env python
"""iwslt14 recipe, stage 'evaluate' (settings from the environment; see README.md here, or --help)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipe_lib"))
from stages import main  # noqa: E402

main("iwslt14", "evaluate")
