"""Every recipe by name: the five published ones (definitions.py) and own_corpus, whose recipe
depends on the environment (TASK, SRC, TGT) and is built when asked for."""

from gpam_fairseq.recipes import own_corpus
from gpam_fairseq.recipes.definitions import RECIPES

NAMES = (*RECIPES, own_corpus.NAME)


def get(name, strict=True):
    """The recipe called name (own_corpus: for the current environment; strict=False accepts a
    missing SRC/TGT, for listings that need no data)."""
    if name == own_corpus.NAME:
        return own_corpus.recipe(strict)
    return RECIPES[name]
