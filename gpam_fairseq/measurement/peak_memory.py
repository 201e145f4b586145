"""Run a fairseq console script in this process, then report the device it used and its peak memory.

    python -m gpam_fairseq.measurement.peak_memory fairseq-generate DATA --path CKPT ...
    python -m gpam_fairseq.measurement.peak_memory fairseq-eval-lm DATA --path CKPT ...

fairseq's command lines print their speed in their last lines but no memory figure, and the
peak GPU memory of a process can only be read inside it (``torch.cuda.max_memory_allocated``).
This module calls the entry point the console script itself calls, with the same arguments,
and prints one line when it returns (or fails)::

    | gpam_fairseq peak_memory | {"device": ..., "cuda_max_memory_allocated": ..., ...}

with the device (``cuda:N (name)`` when the script put anything on a GPU, else ``cpu (N cores,
T torch threads)``), the CUDA allocator's peaks in bytes (None on a CPU: there is no such
figure there) and the peak resident set size of this process in bytes (``getrusage``; CPU
memory, whatever the device). :data:`MARKER` starts the line; :func:`parse` reads it back.
"""

import json
import os
import resource
import sys
from gpam_fairseq.fairseq_glue.cli_errors import refusals_exit_2

MARKER = "| gpam_fairseq peak_memory | "


def _entry_point(script: str):
    from importlib.metadata import entry_points

    found = list(entry_points(group="console_scripts", name=script))
    if not found:
        sys.exit(f"gpam_fairseq.measurement.peak_memory: no console script named {script!r} is installed (e.g. fairseq-generate)")
    return found[0].load()


def report() -> dict:
    """The device and peak memory figures of this process so far."""
    figures = {"device": None, "cuda_max_memory_allocated": None, "cuda_max_memory_reserved": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        figures.update(device=f"cuda:{index} ({torch.cuda.get_device_name(index)})",
                       cuda_max_memory_allocated=int(torch.cuda.max_memory_allocated(index)),
                       cuda_max_memory_reserved=int(torch.cuda.max_memory_reserved(index)))
    else:
        threads = torch.get_num_threads() if torch is not None else None
        figures["device"] = f"cpu ({os.cpu_count()} cores, {threads} torch threads)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    figures["max_rss_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports kB
    return figures


def parse(text: str):
    """The figures of the last report line in a log, or None."""
    found = None
    for line in text.splitlines():
        if MARKER in line:
            found = json.loads(line.split(MARKER, 1)[1])
    return found


@refusals_exit_2
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m gpam_fairseq.measurement.peak_memory FAIRSEQ_CONSOLE_SCRIPT [ARGS ...]")
    script, args = argv[0], argv[1:]
    entry = _entry_point(script)
    sys.argv = [script, *args]
    try:
        return entry()
    finally:
        print(MARKER + json.dumps(report()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
