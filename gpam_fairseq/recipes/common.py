"""Paths, settings from the environment, progress output, stage markers, running fairseq's CLIs."""

import json
import os
import shlex
import sys
import time

from gpam_fairseq.fairseq_glue.tools import run_logged, say
from gpam_fairseq.fairseq_glue.tools import training_progress as _demo_progress


class RecipeError(RuntimeError):
    """A stage cannot go on; the message names the file, flag or variable at fault."""


def stop(line: str):
    """End the program with ``line`` on stderr and exit status 2, the convention of every command
    line the project ships (argparse's own errors, the recipes' stages, fairseq's with the plugin)."""
    print(line, file=sys.stderr, flush=True)
    sys.exit(2)


def env(name: str, default=None):
    value = os.environ.get(name)
    return default if value in (None, "") else value


def env_int(name: str, default):
    value = env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RecipeError(f"{name}={value!r}: must be an integer")


def env_args(name: str):
    """A variable holding extra command-line arguments, split like a shell does."""
    return shlex.split(env(name, ""))


def last_flag(cmd, *names):
    """The value of the last occurrence of a flag in a command line (argparse: the last one
    wins), or None."""
    value = None
    for i, word in enumerate(cmd[:-1]):
        if word in names:
            value = cmd[i + 1]
    return value


def done_marker(folder: str, stage: str) -> str:
    return os.path.join(folder, f".{stage}.done")


def is_done(folder: str, stage: str) -> bool:
    """Whether a stage can be skipped: it finished, and FORCE=1 does not ask to redo it."""
    return has_finished(folder, stage) and env("FORCE") != "1"


def has_finished(folder: str, stage: str) -> bool:
    """Whether an earlier stage finished (FORCE=1 redoes the stage run now, not its prerequisites)."""
    return os.path.exists(done_marker(folder, stage))


def mark_done(folder: str, stage: str, info=None) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(done_marker(folder, stage), "w", encoding="utf-8") as f:
        json.dump({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), **(info or {})}, f, indent=1)


def run_cli(step: str, cmd, log_path: str, echo=None) -> str:
    """Run a command, write its output to log_path, show the lines echo() picks; fail loudly."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    say("  $ " + " ".join(shlex.quote(str(c)) for c in cmd))
    code, text = run_logged(cmd, log_path, echo)
    if code != 0:
        tail = "".join(text.splitlines(keepends=True)[-30:])
        raise RecipeError(f"{step} failed (exit {code}); full log: {log_path}; last lines:\n{tail}")
    return text


def training_progress(name: str):
    """The demo's progress lines (wider update counts), plus fairseq's errors as they come."""
    progress = _demo_progress(name, width=7)

    def echo(line: str):
        shown = progress(line)
        if shown is None and ("| ERROR |" in line or "Traceback" in line):
            return line.rstrip()
        return shown

    return echo


class Progress:
    """Counts lines (or bytes) of a long step and prints a line every few seconds."""

    def __init__(self, what: str, total=None, unit="lines", every_s=5.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.n, self.start = 0, time.time()
        self.last = self.start

    def update(self, k=1):
        self.n += k
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            self.show()

    def show(self):
        rate = self.n / max(time.time() - self.start, 1e-9)
        if self.total:
            say(f"  {self.what}: {self.n:,}/{self.total:,} {self.unit} ({100.0 * self.n / self.total:.0f} %, {rate:,.0f}/s)")
        else:
            say(f"  {self.what}: {self.n:,} {self.unit} ({rate:,.0f}/s)")

    def close(self):
        say(f"  {self.what}: {self.n:,} {self.unit} in {time.time() - self.start:.1f} s")
