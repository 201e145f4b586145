"""Parameter counts of every recipe's MODEL=baseline, baseline_maps, baseline_params and gpam.

    python scripts/parameter_counts.py                  # print the table of every recipe
    python scripts/parameter_counts.py --recipe ptb     # one recipe
    python scripts/parameter_counts.py --update         # rewrite the tables in examples/*/README.md
    python scripts/parameter_counts.py --check          # exit 1 if a README's table is out of date

Each count is that of the model fairseq-train builds for the recipe's own command line
(gpam_fairseq.recipes.controls: built on PyTorch's meta device, so without memory), with the
dictionary sizes the table states. tests/test_controls.py checks the READMEs against it.
"""

import argparse
import logging
import os
import warnings

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT, say
from gpam_fairseq.recipes import controls, matched_controls
from gpam_fairseq.recipes.common import stop
from gpam_fairseq.recipes.definitions import RECIPES


def readme_path(name):
    return os.path.join(REPO_ROOT, "examples", name, "README.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="only this recipe (repeatable)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true", help="write the tables into examples/<recipe>/README.md")
    mode.add_argument("--check", action="store_true", help="compare the READMEs' tables with fresh counts")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # hydra's and fairseq's messages about building models
    warnings.filterwarnings("ignore")
    stale = []
    for name in args.recipe or list(RECIPES):
        say(f"[{name}] building the models of every size and MODEL value ...")
        table = controls.parameter_table(RECIPES[name])
        say(f"\n{name}, {matched_controls.DICTIONARY_NOTE[name]}:\n\n{table}\n")
        if args.update or args.check:
            path = readme_path(name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                current = controls.readme_table(text)
            except controls.ControlError as e:
                stop(f"parameter_counts: {path}: {e}")
            if current != table:
                stale.append(path)
                if args.update:
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(controls.replace_readme_table(text, table))
                    say(f"  updated {path}")
    if args.check and stale:
        stop("parameter_counts: out of date: " + ", ".join(stale) + "; run python scripts/parameter_counts.py --update")
    return stale


if __name__ == "__main__":
    main()
