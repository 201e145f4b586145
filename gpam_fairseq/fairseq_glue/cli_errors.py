"""How a program stops on a user error: one line, as argparse does, instead of a traceback.

A user error is a GPAM option with a value we refuse (:class:`gpam_fairseq.options.
GPAMConfigError`) or a checkpoint that cannot be used (:class:`gpam_fairseq.checkpointing.checkpoints.
CheckpointError`). When nothing catches one, the program ends with

    <program>: error: <message>

as the last line of stderr and exit status 2, like argparse's own errors (``<program>`` is
``sys.argv[0]``'s base name, as argparse spells it). ``GPAM_DEBUG=1`` switches this off: the
usual traceback (and exit status 1) comes back. Every other exception is left alone.

Our code first runs when fairseq imports ``--user-dir gpam_fairseq``, in the middle of the
program, so :func:`install` (called when the package is imported) hooks the places where
such an error ends up instead of wrapping the programs:

* ``sys.excepthook``: an exception nobody caught in a non-interactive process (fairseq-train,
  -generate, -interactive, -eval-lm, ``python -m fairseq_cli.*``, torchrun's workers, scripts
  that load our models). The hook prints the line and raises ``SystemExit(2)``, which CPython
  then handles as a plain ``sys.exit(2)``: threads joined, atexit handlers run (logging,
  tensorboard writers), buffers flushed.
* ``torch.multiprocessing.spawn`` (fairseq's ``call_main`` with several GPUs): the child's
  exception reaches the parent only as the text of a ``ProcessRaisedException``; when its last
  line is one of our errors, the parent reports that error.
* hydra (fairseq-hydra-train) catches the job's exception itself, prints its own shortened
  traceback and exits 1; :class:`hydra.core.utils.JobReturn`'s ``return_value``, where hydra
  raises the failed job's exception again, reports ours instead.
* torchrun: the worker reports as above and also writes the line to torchelastic's error file
  (``TORCHELASTIC_ERROR_FILE``), so that the launcher's failure summary quotes it. The launcher
  is a separate process: its summary and its own traceback are printed after our line.
"""

import functools
import json
import os
import sys
import time
import traceback
from typing import Optional, Tuple

EXIT_STATUS = 2  # argparse's


def debugging() -> bool:
    """GPAM_DEBUG set (to anything but 0): keep Python's traceback."""
    return os.environ.get("GPAM_DEBUG", "") not in ("", "0")


def user_error_classes() -> Tuple[type, ...]:
    from gpam_fairseq.checkpointing.checkpoints import CheckpointError
    from gpam_fairseq.options import GPAMConfigError

    return GPAMConfigError, CheckpointError


def _with_subclasses(classes):
    found = []
    todo = list(classes)
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_error_message(exc: BaseException) -> Optional[str]:
    """The message of a user error, ours or a spawned child's; None for any other exception."""
    classes = user_error_classes()
    if isinstance(exc, classes):
        return one_line(exc)
    spawn = sys.modules.get("torch.multiprocessing.spawn")
    if spawn is not None and isinstance(exc, getattr(spawn, "ProcessRaisedException", ())):
        # the child's traceback, as text: "...\nmodule.Class: message"
        lines = str(exc).rstrip().splitlines()
        last = lines[-1] if lines else ""
        for cls in _with_subclasses(classes):
            prefix = f"{cls.__module__}.{cls.__qualname__}: "
            if last.startswith(prefix):
                return last[len(prefix):]
    return None


def program_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def _tell_torchelastic(line: str) -> None:
    """Under torchrun, put the line in the worker's error file: the launcher's summary quotes it
    ("traceback : <line>") instead of pointing to the torchelastic documentation."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the summary then says "error_file: <N/A>"; the line itself is printed below anyway


def exit_with_error(message: str, tb=None) -> None:
    """Print ``<program>: error: <message>`` on stderr and raise SystemExit(2)."""
    line = f"{program_name()}: error: {message}"
    _tell_torchelastic(line)
    try:
        sys.stdout.flush()  # what the program printed comes before the error
    except (OSError, ValueError):
        pass  # stdout closed or a broken pipe: the error line still goes to stderr
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if tb is not None:
        # release what the failed frames hold (open files are flushed and closed), as the
        # normal exit after a traceback would
        traceback.clear_frames(tb)
    raise SystemExit(EXIT_STATUS)


def refusals_exit_2(main):
    """Wrap a command line's main(): a refusal it raises as ``SystemExit("message")`` (exit status 1
    in Python) prints that one line on stderr and exits with status 2, argparse's and every other
    command line's of the project."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            sys.stdout.flush()
            print(e.code, file=sys.stderr, flush=True)
            raise SystemExit(EXIT_STATUS) from None
    return wrapped


def _interactive() -> bool:
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)


def _excepthook(exc_type, exc, tb):
    message = None if debugging() or _interactive() else user_error_message(exc)
    if message is None:
        return _excepthook.previous(exc_type, exc, tb)
    # CPython handles a SystemExit raised by sys.excepthook like sys.exit(): exit status 2
    exit_with_error(message, tb)


def _install_excepthook() -> None:
    if getattr(sys.excepthook, "__wrapped_by_gpam__", False):
        return
    _excepthook.previous = sys.excepthook
    _excepthook.__wrapped_by_gpam__ = True
    sys.excepthook = _excepthook


def _install_hydra_report() -> None:
    """fairseq-hydra-train: hydra stores the job's exception in a JobReturn and raises it again
    from ``return_value``, inside its own handler (``run_and_report``); report ours there."""
    try:
        from hydra.core.utils import JobReturn, JobStatus
    except ImportError:
        return
    original = JobReturn.__dict__.get("return_value")
    if not isinstance(original, property) or getattr(original.fget, "__wrapped_by_gpam__", False):
        return

    def return_value(self):
        if self.status == JobStatus.FAILED and not debugging() and not _interactive():
            message = user_error_message(self._return_value)
            if message is not None:
                exit_with_error(message, self._return_value.__traceback__)
        return original.fget(self)

    return_value.__wrapped_by_gpam__ = True
    JobReturn.return_value = property(return_value, original.fset, original.fdel, original.__doc__)


def install() -> None:
    """Called when gpam_fairseq is imported; installing twice changes nothing."""
    _install_excepthook()
    _install_hydra_report()
