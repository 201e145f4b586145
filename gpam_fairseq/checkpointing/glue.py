"""Thin wrappers around ``fairseq.checkpoint_utils``, installed when gpam_fairseq is imported.

fairseq's console scripts load and save checkpoints through module attributes of
``fairseq.checkpoint_utils`` (looked up at each call), so replacing those attributes is the one
place where our plugin can take part. Every wrapper calls fairseq's function unchanged; it
only adds, around it:

* ``load_checkpoint_to_cpu`` (every load: -generate, -eval-lm, -interactive, -train's resume,
  ``from_pretrained``, our scripts): nothing when the load works. When it fails and the file is
  to blame (missing, empty, truncated, not a torch checkpoint), :class:`~gpam_fairseq.checkpointing.checkpoints.
  CheckpointError` names the file and the fault instead of torch's ``OSError: [Errno 22]`` or
  ``IndexError: pop from empty list``; torch's weights_only refusal becomes the one-line
  :class:`~gpam_fairseq.checkpointing.checkpoints.CheckpointRefused`. The allowlist is torch's, untouched.
* ``load_model_ensemble_and_task`` (builds models from checkpoints): a missing file is our
  error instead of fairseq's ``OSError: Model file not found``; a model that no loaded code
  registers, or that cannot serve the run's task (a language model given to a translation
  task, which fairseq-generate would otherwise "translate" with), is named the same way.
* ``torch_persistent_save`` and ``save_checkpoint`` (fairseq-train's saves): fairseq writes the
  first file of a save to ``<name>.tmp`` and renames it, without fsync, then *copies* it onto
  the others (``checkpoint_last.pt``, ``checkpoint_best.pt``) with ``shutil.copyfile``, in place:
  a run killed during that copy leaves a truncated ``checkpoint_last.pt``, and the next run
  cannot resume. Here every file of a save is written to ``<name>.tmp`` in the same folder,
  fsynced, and moved over the old one with ``os.replace``: each name always holds a complete
  checkpoint, the previous or the new one.
* ``load_checkpoint`` (fairseq-train's resume): what would make a resumed run differ from the
  run it continues, or stop it without a way out:

  - the batches. fairseq groups sentences into batches once, when the run creates its training
    iterator, with the random order of ``ordered_indices`` under the seed ``--seed + epoch``,
    and reuses that iterator, and those batches, for every later epoch (only their order is
    shuffled anew each epoch). A run resumed in epoch E creates its iterator in epoch E, so
    its batches group the sentences differently (ties between sentences of equal length fall
    another way): from epoch 2 on, a resumed run trains on other batches. Here the resumed
    run's batches are made as the uninterrupted run made them, in epoch 1, wherever fairseq
    would have kept them (the iterator is reused: not sharded data, no --rebuild-batches,
    no --update-epoch-batch-itr); the position in the epoch and the epoch's order are still
    fairseq's, from the checkpoint.
  - a damaged checkpoint to resume from (written by a run without this plugin, or by a
    failing disk) stops with its one line, which also names the newest intact checkpoint in
    the same folder and the ``--restore-file`` that resumes from it.
  - ``--max-update``: fairseq checks it only after an update, so a run restarted from the
    checkpoint of its last update (killed after saving it, before exiting) would train one
    update more than the run it continues. Such a run ends at once instead, saying so, with
    exit status 0.
"""

import contextlib
import functools
import inspect
import logging
import os
import pickle
import shutil

import torch
from fairseq import checkpoint_utils
from fairseq.file_io import PathManager

from gpam_fairseq.checkpointing.checkpoints import (
    CheckpointError,
    damaged_file_error,
    model_name,
    model_problem,
    model_task_mismatch,
    newest_intact_checkpoint,
    torch_refusal,
    write_atomically,
)


logger = logging.getLogger(__name__)


def _local(path) -> bool:
    return isinstance(path, str) and not PathManager.path_requires_pathmanager(path)


def _diagnose_load(original):
    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            return original(path, *args, **kwargs)
        except CheckpointError:
            raise
        except Exception as err:
            if not _local(path):
                raise
            damaged = damaged_file_error(path)
            if damaged is not None:
                raise damaged from err
            if isinstance(err, pickle.UnpicklingError):  # an intact file: torch's weights_only refusal
                raise torch_refusal(path, err) from err
            raise

    return load_checkpoint_to_cpu


def _diagnose_models(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_model_ensemble_and_task(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        filenames, task = list(call.arguments["filenames"]), call.arguments["task"]
        if call.arguments.get("state") is None:  # fairseq's own check, with our error
            num_shards, suffix = call.arguments["num_shards"], call.arguments["suffix"]
            for filename in filenames:
                for shard in range(num_shards):
                    path = checkpoint_utils.get_maybe_sharded_checkpoint_filename(filename, suffix, shard, num_shards)
                    if not PathManager.exists(path):
                        raise CheckpointError(f"{path}: no such file")
        try:
            ensemble, cfg, built_task = original(*call.args, **call.kwargs)
        except CheckpointError:
            raise
        except Exception as err:
            for filename in filenames:
                problem = model_problem(filename, task) if _local(filename) else None
                if problem is not None:
                    raise CheckpointError(problem) from err
            raise
        for filename, model in zip(filenames, ensemble):
            mismatch = model_task_mismatch(built_task, type(model), model_name(type(model)))
            if mismatch is not None:
                raise CheckpointError(f"{filename}: {mismatch}")
        return ensemble, cfg, built_task

    return load_model_ensemble_and_task


def _atomic_save(original):
    @functools.wraps(original)
    def torch_persistent_save(obj, filename, async_write: bool = False):
        if async_write or not _local(filename) or not PathManager.supports_rename(filename):
            return original(obj, filename, async_write)
        write_atomically(filename, lambda f: torch.save(obj, f))

    return torch_persistent_save


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """PathManager.copy for the copies of a save: through a temporary file, then os.replace."""
    if not (_local(src_path) and _local(dst_path)):
        return _ORIGINAL_COPY(src_path, dst_path, overwrite)
    if not overwrite and os.path.exists(dst_path):
        return False
    with open(src_path, "rb") as src:
        write_atomically(dst_path, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
    return True


_ORIGINAL_COPY = PathManager.copy
_ORIGINAL_COPY_ATTRIBUTE = PathManager.__dict__["copy"]  # the staticmethod itself


@contextlib.contextmanager
def _atomic_copies():
    PathManager.copy = staticmethod(atomic_copy)
    try:
        yield
    finally:
        PathManager.copy = _ORIGINAL_COPY_ATTRIBUTE


def _atomic_copies_while_saving(original):
    # fairseq keeps its best score on this function object (save_checkpoint.best), looked up
    # through the module attribute, that is on this wrapper: the attribute stays consistent
    @functools.wraps(original)
    def save_checkpoint(*args, **kwargs):
        with _atomic_copies():
            return original(*args, **kwargs)

    return save_checkpoint


def _keeps_first_epoch_batches(trainer, dataset, kwargs) -> bool:
    """Would fairseq-train reuse the iterator, and so the batches, it made in epoch 1?
    (fairseq_cli/train.py with FairseqTask.get_batch_iterator's cache and rebuild_batches)"""
    task = trainer.task
    return (not kwargs.get("disable_iterator_cache", False) and not kwargs.get("update_epoch_batch_itr", False)
            and task.can_reuse_epoch_itr(dataset) and not getattr(task.cfg, "rebuild_batches", False)
            and not task.has_sharded_data(trainer.cfg.dataset.train_subset))


@contextlib.contextmanager
def _batches_made_in_epoch_1(trainer):
    task = trainer.task
    original = task.get_batch_iterator

    def get_batch_iterator(*args, **kwargs):
        dataset = kwargs["dataset"] if "dataset" in kwargs else args[0]
        if kwargs.get("epoch", 1) > 1 and _keeps_first_epoch_batches(trainer, dataset, kwargs):
            # the epoch itself comes from the checkpoint (EpochBatchIterator.load_state_dict)
            kwargs["epoch"] = 1
            if trainer.cfg.dataset.update_ordered_indices_seed:  # the seed Trainer.get_train_iterator gives epoch 1
                kwargs["seed"] = trainer.cfg.common.seed + 1
        return original(*args, **kwargs)

    task.get_batch_iterator = get_batch_iterator
    try:
        yield
    finally:
        del task.get_batch_iterator  # the task's own method again


def _exact_resume(original):
    @functools.wraps(original)
    def load_checkpoint(cfg, trainer, **passthrough_args):
        try:
            with _batches_made_in_epoch_1(trainer):
                extra_state, epoch_itr = original(cfg, trainer, **passthrough_args)
        except CheckpointError as err:
            if err.path is None:  # not a damaged file (a refused one, say): no fallback to offer
                raise
            fallback = newest_intact_checkpoint(os.path.dirname(err.path) or ".", besides=err.path)
            if fallback is None:
                raise
            raise CheckpointError(f"{err}; the newest intact checkpoint next to it is {fallback}: add "
                                  f"--restore-file {fallback} to resume from it") from err
        max_update = trainer.cfg.optimization.max_update
        if extra_state is not None and max_update and trainer.get_num_updates() >= max_update:
            logger.info(f"resumed at update {trainer.get_num_updates()}, --max-update {max_update}: training is "
                        "complete, nothing left to do")
            raise SystemExit(0)
        return extra_state, epoch_itr

    return load_checkpoint


WRAPPERS = {
    "load_checkpoint_to_cpu": _diagnose_load,
    "load_model_ensemble_and_task": _diagnose_models,
    "torch_persistent_save": _atomic_save,
    "save_checkpoint": _atomic_copies_while_saving,
    "load_checkpoint": _exact_resume,
}


def install() -> None:
    """Wrap fairseq's functions once (importing gpam_fairseq twice changes nothing)."""
    for name, wrap in WRAPPERS.items():
        current = getattr(checkpoint_utils, name)
        if getattr(current, "__wrapped_by_gpam__", False):
            continue
        wrapper = wrap(current)
        wrapper.__wrapped_by_gpam__ = True
        setattr(checkpoint_utils, name, wrapper)
