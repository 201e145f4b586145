"""The recipes of the paper's experiments (IWSLT14, WMT14 En-De, WikiText-103, Enwik8, PTB).

Each recipe folder ``examples/<task>/`` has four stage scripts (prepare, preprocess, train,
evaluate) that call :func:`gpam_fairseq.recipes.stages.main` with the recipe's name; the
recipes themselves are declared in :mod:`gpam_fairseq.recipes.definitions`, the data
preparation in :mod:`gpam_fairseq.recipes.preparation`, the text processing in
:mod:`gpam_fairseq.recipes.text`.
"""
