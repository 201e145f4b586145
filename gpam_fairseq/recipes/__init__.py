"""Shared code of the recipes in examples/<task>/ (IWSLT14, WMT14 En-De, WikiText-103, Enwik8, PTB).

Each recipe folder has four stage scripts (prepare, preprocess, train, evaluate) that call
:func:`recipe_lib.stages.main` with the recipe's name; the recipes themselves are declared
in :mod:`recipe_lib.recipes`, the data preparation in :mod:`recipe_lib.recipe_data`.
"""
