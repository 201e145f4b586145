"""The recipes of the paper's experiments (IWSLT14, WMT14 En-De, WikiText-103, Enwik8, PTB).

Each recipe folder ``examples/<task>/`` has four stage scripts (prepare, preprocess, train,
evaluate) that call :func:`gpam_fairseq.recipes.stages.main` with the recipe's name; the
recipes themselves are declared in :mod:`gpam_fairseq.recipes.definitions`, the data
preparation in :mod:`gpam_fairseq.recipes.preparation`, the text processing in
:mod:`gpam_fairseq.recipes.text`. Around the runs: the matched baselines
(:mod:`~gpam_fairseq.recipes.matched_controls`) and their parameter tables
(:mod:`~gpam_fairseq.recipes.controls`, :mod:`~gpam_fairseq.recipes.parameter_counts`), λ sweeps
(:mod:`gpam_fairseq.recipes.sweep`) and the comparison of finished runs
(:mod:`gpam_fairseq.recipes.compare`).
"""
