"""Checkpoints: loading with torch's weights_only protection kept on, a file that cannot be used
named in one line, and writes that a killed process cannot leave half done.

Every script of this project (comparison, analysis, benchmark, checkpoint averaging, hub
loading in the examples) loads checkpoints through :func:`load_state` and :func:`load_models`,
so that the allowlist of :mod:`gpam_fairseq.fairseq_glue.compat` is the only thing that decides what a
checkpoint may unpickle. fairseq's own loaders (fairseq-generate, -eval-lm, -train's resume,
``from_pretrained``) get the same diagnosis through :mod:`gpam_fairseq.checkpointing.glue`.

Before one of our loaders opens a file, its pickle is scanned (``torch.serialization.
get_unsafe_globals_in_checkpoint`` reads the opcodes, it runs nothing); a file that names a
global outside the allowlist is refused with :class:`CheckpointRefused`, one line naming the
file and the global. torch's own ``weights_only`` unpickler stays the barrier behind that
scan, and its refusals are reworded the same way.

A file that cannot be read at all (missing, empty, cut off while being written, not a torch
checkpoint) or that holds a model this run cannot use stops with :class:`CheckpointError`,
``<file>: <what is wrong>``; a program that does not catch it ends with that line
(:mod:`gpam_fairseq.fairseq_glue.cli_errors`).
"""

import os
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from fairseq import checkpoint_utils

from gpam_fairseq.fairseq_glue.compat import allow_fairseq_checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line, ``<file>: <what is wrong>``.
    ``path``: the file, when the fault is the file itself (missing, empty, damaged)."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path


class CheckpointRefused(CheckpointError, pickle.UnpicklingError):
    """A checkpoint pickles a global outside the allowlist; nothing of it was executed."""


def _refusal(path: str, offending: str) -> CheckpointRefused:
    return CheckpointRefused(
        f"refused to load {path}: it pickles {offending}, which is not on gpam_fairseq's "
        "checkpoint allowlist (gpam_fairseq/fairseq_glue/compat.py); nothing in it was executed. Use only "
        "checkpoints from a source you trust; to inspect this one, list its globals with "
        "torch.serialization.get_unsafe_globals_in_checkpoint(path)"
    )


# ----------------------------------------------------------------------------- what is wrong with a file

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive (since torch 1.6)
# torch's older format starts with a pickled magic number (protocol 2, a 10-byte long)
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def is_legacy_format(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC


def holds_torch_pickle(names: Sequence[str]) -> bool:
    """Whether the member names of a zip archive include the pickle torch.save writes."""
    return any(name == "data.pkl" or name.endswith("/data.pkl") for name in names)


def file_problem(path: str) -> Optional[str]:
    """What keeps ``path`` from being read as a torch checkpoint, in a few words; None when its
    container is intact (then a failure lies in what it holds). Reads the whole file only when
    it is a zip archive, to check every member: call it when a load has failed."""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "a directory, not a checkpoint file"
    size = os.path.getsize(path)
    if size == 0:
        return "empty file (0 bytes), not a checkpoint; was the run that wrote it killed while saving?"
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(LEGACY_MAGIC):
        return None
    if not head.startswith(ZIP_MAGIC):
        try:
            what = f"a text file beginning {head[:24].decode('utf-8')!r}"
        except UnicodeDecodeError:
            what = f"a binary file beginning {head[:12]!r}"
        return f"not a torch checkpoint: {what} ({size} bytes), where torch.save writes a zip archive"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        return (f"truncated ({size} bytes): the zip archive torch.save writes ends before its directory; the file "
                "was cut off while being written (a run killed while saving, a full disk, an interrupted copy)")
    if damaged is not None:
        return f"damaged: {damaged} in its zip archive fails its checksum"
    if not holds_torch_pickle(names):
        return "a zip archive but not a torch checkpoint (it has no data.pkl)"
    return None


def newest_intact_checkpoint(folder: str, besides: str) -> Optional[str]:
    """The most recently written ``*.pt`` of ``folder`` (other than ``besides``) whose zip
    directory is intact: where a run whose checkpoint_last.pt is damaged can resume from."""
    try:
        names = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".pt")]
    except OSError:
        return None
    others = [p for p in names if os.path.abspath(p) != os.path.abspath(besides) and os.path.isfile(p)]
    for path in sorted(others, key=os.path.getmtime, reverse=True):
        try:
            with zipfile.ZipFile(path) as archive:  # reads the directory only
                if holds_torch_pickle(archive.namelist()):
                    return path
        except (zipfile.BadZipFile, OSError):
            continue
    return None


def damaged_file_error(path: str) -> Optional[CheckpointError]:
    """A CheckpointError naming what is wrong with the file, when the file is to blame for a failed load."""
    problem = file_problem(path)
    return None if problem is None else CheckpointError(f"{path}: {problem}", path)


# ----------------------------------------------------------------------------- what model a file holds


def saved_model_name(path: str) -> Optional[str]:
    """The model (or architecture) name recorded in a checkpoint, read without its tensors (mmap).

    Used only to explain a failed load: the load has already read the file once."""
    state = torch.load(path, map_location="cpu", mmap=True)  # weights_only: the allowlist applies
    cfg = state.get("cfg") or {}
    model = cfg.get("model") if cfg.get("model") is not None else state.get("args")
    for key in ("_name", "arch"):
        value = model.get(key) if isinstance(model, dict) else getattr(model, key, None)
        if value:
            return str(value)
    return None


def registered_model_class(name: str):
    """The class fairseq builds for a model or architecture name; None when nothing registers it."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    return ARCH_MODEL_REGISTRY.get(name) or MODEL_REGISTRY.get(name)


def unregistered_model(path: str, name: str) -> str:
    return (f"{path}: holds a model named {name!r}, which neither fairseq nor the loaded plugins register; "
            "load it with the --user-dir of the plugin that trained it")


def task_name(task) -> str:
    """The name a task is registered under (what --task takes)."""
    from fairseq.tasks import TASK_REGISTRY

    return next((name for name, cls in TASK_REGISTRY.items() if cls is type(task)), type(task).__name__)


def model_name(model_cls: type) -> str:
    """The name a model class is registered under (fairseq's model name, not an architecture)."""
    from fairseq.models import MODEL_REGISTRY

    return next((name for name, cls in MODEL_REGISTRY.items() if cls is model_cls), model_cls.__name__)


def model_task_mismatch(task, model_cls, name: str) -> Optional[str]:
    """Why a model of this class cannot serve this task, or None. Only the two certain cases:
    a language model cannot translate, an encoder-decoder model cannot be a language model."""
    from fairseq.models import FairseqEncoderDecoderModel, FairseqLanguageModel
    from fairseq.tasks.language_modeling import LanguageModelingTask
    from fairseq.tasks.translation import TranslationTask

    if task is None or model_cls is None:
        return None
    if isinstance(task, TranslationTask) and issubclass(model_cls, FairseqLanguageModel):
        return (f"holds a language model ({name}), but this run's task is {task_name(task)}, which needs a "
                "translation (encoder-decoder) model; evaluate it with fairseq-eval-lm or --task language_modeling")
    if isinstance(task, LanguageModelingTask) and issubclass(model_cls, FairseqEncoderDecoderModel):
        return (f"holds a translation (encoder-decoder) model ({name}), but this run's task is "
                f"{task_name(task)}, which needs a language model; use fairseq-generate or --task translation")
    return None


def model_problem(path: str, task=None, expected_class: Optional[type] = None) -> Optional[str]:
    """Why the model saved in ``path`` cannot be built here, or None if that is not the reason.
    ``task``: the task it is loaded into (None: its own); ``expected_class``: a hub's class."""
    try:
        name = saved_model_name(path)
    except Exception:  # noqa: BLE001  the file is unreadable: the loader's own error stands
        return None
    if name is None:
        return None
    model_cls = registered_model_class(name)
    if model_cls is None:
        return unregistered_model(path, name)
    name = model_name(model_cls)  # the model, not one of its architectures
    if expected_class is not None and not issubclass(model_cls, expected_class):
        return wrong_class(path, name, model_cls, expected_class)
    mismatch = model_task_mismatch(task, model_cls, name)
    return f"{path}: {mismatch}" if mismatch else None


def wrong_class(path: str, name: str, model_cls: type, expected_class: type) -> str:
    return (f"{path}: holds a {name} model ({model_cls.__name__}), not a {expected_class.__name__}; "
            f"load it with {model_cls.__name__}.from_pretrained")


# ----------------------------------------------------------------------------- our loaders


def _unsafe_globals(path: str) -> List[str]:
    """The globals the file's pickle names outside the allowlist (a scan, no execution)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        if scan is None or is_legacy_format(path):
            # torch < 2.5, or torch's pre-zip format, which the scan cannot read: torch.load's
            # weights_only unpickler is then the check
            return []
        return list(scan(path))
    except Exception as err:
        raise damaged_file_error(path) or CheckpointError(
            f"{path}: cannot read its pickle ({type(err).__name__}: {err})".replace("\n", " ")
        ) from err


def check_checkpoint(path: str) -> None:
    """Raise CheckpointError if the file cannot be read, CheckpointRefused if it pickles a
    global outside the allowlist."""
    allow_fairseq_checkpoints()
    unsafe = _unsafe_globals(path)
    if unsafe:
        names = ", ".join(sorted(unsafe))
        raise _refusal(path, f"the global{'s' if len(unsafe) > 1 else ''} {names}")


def torch_refusal(path: str, err: pickle.UnpicklingError) -> CheckpointRefused:
    """torch's weights_only refusal (several lines, and advice to allow the global) as our line."""
    named = re.search(r"GLOBAL (\S+)", str(err))
    if named:
        return _refusal(path, f"the global {named.group(1)}")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return _refusal(path, f"something torch refused ({lines[-1]})")


def load_state(path: str, arg_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint's dictionary (model weights, cfg, optimizer history) on the CPU."""
    check_checkpoint(path)
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise torch_refusal(path, err) from None


def load_saved(path: str) -> Any:
    """What ``path`` holds exactly as it was saved, on the CPU: no fairseq upgrade of its cfg, so a
    bare ``{"model": state_dict}`` (which fairseq's own loader refuses for lack of ``best_loss``) loads
    too. Scanned and weights-only loaded under the allowlist, as :func:`load_state`."""
    check_checkpoint(path)
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise torch_refusal(path, err) from None


def load_models(
    paths: Sequence[str], arg_overrides: Optional[Dict[str, Any]] = None, task=None
) -> Tuple[List[Any], Any, Any]:
    """(models, cfg, task) as fairseq-generate builds them."""
    paths = list(paths)
    for path in paths:
        check_checkpoint(path)
    try:
        return checkpoint_utils.load_model_ensemble_and_task(
            paths, arg_overrides=arg_overrides, task=task
        )
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise torch_refusal(", ".join(paths), err) from None


# ----------------------------------------------------------------------------- writing


def fsync_directory(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def write_atomically(path: str, write: Callable[[Any], None]) -> None:
    """``write(f)`` into ``<path>.tmp`` in the same folder, fsync it, then ``os.replace`` it onto
    ``path``: at every moment ``path`` holds either its previous content or all of the new one,
    whenever the process is killed; after a crash of the machine too, thanks to the fsyncs."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


# ----------------------------------------------------------------------------- the hub


def from_pretrained_checked(cls, load: Callable[[], Any], model_name_or_path: str, checkpoint_file: str):
    """``load()`` is fairseq's ``from_pretrained`` for ``cls``; fairseq builds whatever model the
    checkpoint holds and ignores ``cls``. Refuse, naming the file, a folder that does not exist,
    a file that cannot be read, and a model that is not a ``cls``."""
    local = isinstance(model_name_or_path, str) and model_name_or_path not in cls.hub_models() and \
        "://" not in model_name_or_path
    if local and not os.path.exists(model_name_or_path):
        raise CheckpointError(f"{model_name_or_path}: no such directory")
    paths = [os.path.join(model_name_or_path, name) for name in checkpoint_file.split(os.pathsep)] if local else []
    try:
        hub = load()
    except CheckpointError:
        raise
    except Exception as err:
        for path in paths:
            problem = model_problem(path, expected_class=cls)
            if problem is not None:
                raise CheckpointError(problem) from err
        raise
    for path, model in zip(paths, hub.models):
        if not isinstance(model, cls):
            raise CheckpointError(wrong_class(path, model_name(type(model)), type(model), cls))
    return hub


class CheckedHubLoading:
    """Mixin of our models: fairseq's ``from_pretrained``, where a missing or unreadable file,
    or a checkpoint of another model, stops with :class:`CheckpointError` naming the file
    (:func:`from_pretrained_checked`). Put it before the fairseq model class."""

    @classmethod
    def from_pretrained(cls, model_name_or_path, checkpoint_file="model.pt", data_name_or_path=".", **kwargs):
        parent = super()
        return from_pretrained_checked(
            cls,
            lambda: parent.from_pretrained(model_name_or_path, checkpoint_file, data_name_or_path, **kwargs),
            model_name_or_path,
            checkpoint_file,
        )
