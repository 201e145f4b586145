"""Paths, settings from the environment, progress output, stage markers, running fairseq's CLIs."""

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
USER_DIR = os.path.join(REPO, "gpam_fairseq")
sys.path.insert(0, os.path.join(REPO, "examples", "quickstart"))

from demo import log_records, read_generate_output  # noqa: E402,F401  (one parser for fairseq's logs)


class RecipeError(RuntimeError):
    """A stage cannot go on; the message names the file, flag or variable at fault."""


def say(msg: str) -> None:
    print(msg, flush=True)


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


def fairseq_cli(name: str) -> str:
    """The console script next to this Python (the venv's), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else name


def done_marker(folder: str, stage: str) -> str:
    return os.path.join(folder, f".{stage}.done")


def is_done(folder: str, stage: str) -> bool:
    return os.path.exists(done_marker(folder, stage)) and env("FORCE") != "1"


def mark_done(folder: str, stage: str, info=None) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(done_marker(folder, stage), "w", encoding="utf-8") as f:
        json.dump({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), **(info or {})}, f, indent=1)


def run_cli(step: str, cmd, log_path: str, echo=None) -> str:
    """Run a command, write its output to log_path, show the lines echo() picks; fail loudly."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    say("  $ " + " ".join(shlex.quote(str(c)) for c in cmd))
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO)
        for line in proc.stdout:
            log.write(line)
            shown = echo(line) if echo else None
            if shown:
                say(shown)
        proc.wait()
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = "".join(f.readlines()[-30:])
        raise RecipeError(f"{step} failed (exit {proc.returncode}); full log: {log_path}; last lines:\n{tail}")
    with open(log_path, encoding="utf-8") as f:
        return f.read()


def training_progress(name: str):
    def echo(line: str):
        for stats in log_records([line], "train_inner"):
            return f"  [{name}] update {stats['num_updates']:>7}  loss {stats['loss']}  wps {stats.get('wps', '-')}"
        for stats in log_records([line], "valid"):
            return f"  [{name}] validation after update {stats['valid_num_updates']}: loss {stats['valid_loss']}"
        if "| ERROR |" in line or "Traceback" in line:
            return line.rstrip()
        return None

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


def download(url: str, dest: str) -> None:
    """Download url to dest (via dest.part), showing progress; a finished file is kept."""
    if os.path.exists(dest):
        say(f"  {os.path.basename(dest)}: already downloaded")
        return
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    say(f"  downloading {url}")
    part = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            progress = Progress(os.path.basename(dest), total, unit="bytes")
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                progress.update(len(block))
            progress.close()
    except OSError as e:
        raise RecipeError(
            f"cannot download {url} ({e}); on an offline machine download it elsewhere and pass "
            f"--archive PATH or --raw-dir DIR to the prepare stage"
        )
    os.replace(part, dest)
