#!/usr/bin/env python
"""enwik8 recipe, stage 'prepare' (settings from the environment; see README.md here, or --help;
--list-sources [--json] shows what it downloads, with sizes and checksums)."""
from gpam_fairseq.recipes.stages import main

main("enwik8", "prepare")
