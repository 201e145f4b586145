#!/usr/bin/env python
"""wikitext103 recipe, stage 'prepare' (settings from the environment; see README.md here, or --help;
--list-sources [--json] shows what it downloads, with sizes and checksums)."""
from gpam_fairseq.recipes.stages import main

main("wikitext103", "prepare")
