"""Every evaluation sentence counted: fairseq's batching keeps the last batch of a subset it evaluates.

fairseq's ``data_utils.batch_by_size`` drops the last batch whenever its size is not a multiple of
``--required-batch-size-multiple`` (default 8). In training that only shortens an epoch, but the
same function batches what fairseq evaluates: ``fairseq-train``'s validation subsets (so the
logged validation loss and the best-checkpoint choice see part of the data), ``fairseq-validate``,
``fairseq-generate`` (a 20-sentence test set at ``--batch-size 8`` gives 16 hypotheses, and, the
batches being sorted by length, it is the longest sentences that vanish) and ``fairseq-eval-lm``.

With ``--user-dir gpam_fairseq`` (or after ``import gpam_fairseq``) :func:`install` gives every
batching outside training that last batch back, whatever the flag is and whatever the
architecture (the stock ``transformer`` too, so comparisons stay fair). Training batches are left
exactly as fairseq makes them: batching requested through ``Trainer.get_train_iterator`` (also the
per-epoch rebuilding of ``--rebuild-batches``) runs fairseq's own function unchanged. The first
time a batch is kept the process logs one line saying so.

:func:`subset_size` counts the sentences of a binarised subset, to check that an evaluation saw
every one of them (fairseq-generate's hypotheses, say).
"""

import contextlib
import contextvars
import functools
import glob
import logging
import os
from typing import Optional

import numpy as np

from gpam_fairseq.fairseq_glue.precision import _wrap  # wraps a fairseq function once

logger = logging.getLogger(__name__)

_TRAINING = contextvars.ContextVar("gpam_fairseq_training_batches", default=False)
_LOGGED = False


@contextlib.contextmanager
def training_batches():
    """Batching inside this block is training batching: fairseq's behaviour, unchanged."""
    token = _TRAINING.set(True)
    try:
        yield
    finally:
        _TRAINING.reset(token)


def kept_remainder(indices, batches, required_batch_size_multiple: int):
    """``batches`` with the indices fairseq's batch_by_size left out appended as one last batch.

    fairseq cuts ``indices`` into consecutive batches and drops only the last one, so what is
    missing is the tail of ``indices`` after the batched ones; it met the size limits already."""
    indices = np.asarray(indices, dtype=np.int64) if not isinstance(indices, np.ndarray) else indices
    batched = sum(len(b) for b in batches)
    if batched >= len(indices):
        return batches
    tail = indices[batched:]
    _log_once(len(tail), len(indices), required_batch_size_multiple)
    return list(batches) + [tail]


def _log_once(kept: int, total: int, multiple: int) -> None:
    global _LOGGED
    if not _LOGGED:
        _LOGGED = True
        logger.info(
            f"gpam_fairseq: every evaluation sentence counted: kept the last batch of {kept} of {total} sentences, "
            f"which fairseq drops since --required-batch-size-multiple {multiple} does not divide it "
            f"(training batches unchanged)")


def _batch_by_size(original):
    @functools.wraps(original)
    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1, fixed_shapes=None):
        batches = original(indices, num_tokens_fn, num_tokens_vec=num_tokens_vec, max_tokens=max_tokens,
                           max_sentences=max_sentences, required_batch_size_multiple=required_batch_size_multiple,
                           fixed_shapes=fixed_shapes)
        if _TRAINING.get() or fixed_shapes is not None or required_batch_size_multiple <= 1:
            return batches
        return kept_remainder(indices, batches, required_batch_size_multiple)

    batch_by_size.__wrapped_by_gpam__ = True
    return batch_by_size


def _in_training(make_batches):
    @functools.wraps(make_batches)
    def rebuild(*args, **kwargs):
        with training_batches():
            return make_batches(*args, **kwargs)

    return rebuild


def _get_train_iterator(original):
    @functools.wraps(original)
    def get_train_iterator(self, *args, **kwargs):
        with training_batches():
            iterator = original(self, *args, **kwargs)
        sampler = getattr(iterator, "batch_sampler", None)
        if callable(sampler) and not getattr(sampler, "__wrapped__", None):  # --rebuild-batches: batched each epoch
            iterator.batch_sampler = _in_training(sampler)
        return iterator

    get_train_iterator.__wrapped_by_gpam__ = True
    return get_train_iterator


def install() -> None:
    """Called when gpam_fairseq is imported; installing twice changes nothing."""
    from fairseq.data import data_utils
    from fairseq.trainer import Trainer

    _wrap(data_utils, "batch_by_size", _batch_by_size)
    _wrap(Trainer, "get_train_iterator", _get_train_iterator)


# ----------------------------------------------------------------------------- checking a run


def subset_size(data_bin: str, subset: str = "test", lang: Optional[str] = None) -> int:
    """The number of sentences of ``subset`` in a fairseq-preprocess folder (the first one of a
    ``path1:path2`` list, the one fairseq evaluates): ``<subset>.<src>-<tgt>.<lang>.idx`` of a
    translation folder (both sides must agree; ``lang`` picks one side of a folder holding
    several pairs) or ``<subset>.idx`` of a language-modelling one. Raises FileNotFoundError
    when the folder holds no such subset, ValueError when its sides disagree."""
    from fairseq.data import indexed_dataset

    folder = data_bin.split(os.pathsep)[0]
    pattern = f"{subset}.*-*.{lang}.idx" if lang else f"{subset}.*-*.*.idx"
    found = sorted(glob.glob(os.path.join(folder, pattern))) or sorted(glob.glob(os.path.join(folder, f"{subset}.idx")))
    if not found:
        raise FileNotFoundError(f"{folder}: no binarised {subset} subset ({subset}.<pair>.<lang>.idx or {subset}.idx)")
    sizes = {}
    for idx in found:
        prefix = idx[: -len(".idx")]
        dataset = indexed_dataset.make_dataset(prefix, impl=indexed_dataset.infer_dataset_impl(prefix))
        sizes[os.path.basename(prefix)] = len(dataset)
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{folder}: the {subset} files hold different numbers of sentences: "
                         + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return next(iter(sizes.values()))
