"""Driving fairseq from Python: its console scripts, its logs, its models without data.

What the demo (``examples/quickstart/demo.py``), the recipes (:mod:`gpam_fairseq.recipes`),
the scripts in ``scripts/`` and the tests share, in one place:

* running a fairseq console script with its output in a log file and chosen lines shown as
  progress (:func:`fairseq_cli`, :func:`run_logged`, :func:`training_progress`, :func:`say`);
* reading what it wrote: the statistics of ``--log-format json`` lines (:func:`log_records`,
  :func:`parse_training_log`), fairseq-generate's hypotheses (:func:`read_generate_output`) and
  fairseq-eval-lm's loss and perplexity (:func:`read_eval_lm_output`);
* building the model fairseq-train would build for a command line, with dictionaries of a
  given size instead of a data folder (:func:`parse_training_args`, :func:`task_without_data`,
  :func:`build_translation_model`, :func:`build_language_model`).

``USER_DIR`` is the folder to pass as ``--user-dir``: the package this module belongs to, so
that the console scripts load the same code as the caller.
"""

import json
import os
import re
import statistics
import subprocess
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# --user-dir for fairseq's console scripts: this package's folder
USER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the gpam_fairseq package
# The folder holding the package: the repository root of a source checkout (``make`` installs
# the package editable from it). Commands run there, and the recipes put their default data/,
# checkpoints/ and runs/ folders under it.
REPO_ROOT = os.path.dirname(USER_DIR)

# Dictionary sizes of the paper's setups as fairseq's recipes produce them: IWSLT14 de-en
# (10k joint BPE, separate dictionaries), WMT14/16 en-de (32k joint BPE, joined
# dictionary), WikiText-103 (word level).
IWSLT_DE, IWSLT_EN = 8848, 6632
WMT_JOINED = 32768
WIKI103 = 267744

# ----------------------------------------------------------------------------- console scripts


def say(msg: str) -> None:
    print(msg, flush=True)


def fairseq_cli(name: str) -> str:
    """The console script next to this Python (the venv's), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else name


def run_logged(cmd: Sequence, log_path: str, echo: Optional[Callable[[str], Optional[str]]] = None,
               cwd: str = REPO_ROOT, env: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    """Run a command, its output into log_path; echo(line) picks lines to show as progress.
    env: the command's environment (default: this process's). Returns (exit code, the whole output)."""
    # fairseq's console scripts log to stdout, which Python block-buffers into a pipe: without
    # PYTHONUNBUFFERED the progress lines (and the log file) would come in 8 kB bursts
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env
        )
        for line in proc.stdout:
            log.write(line)
            shown = echo(line) if echo else None
            if shown:
                say(shown)
        proc.wait()
    with open(log_path, encoding="utf-8") as f:
        return proc.returncode, f.read()


def log_records(lines: Iterable[str], tag: str) -> List[dict]:
    """The statistics of fairseq's `--log-format json` lines of one kind (train_inner, train, valid)."""
    marker = f"| {tag} | "
    return [json.loads(line.split(marker, 1)[1]) for line in lines if marker in line]


def training_progress(system: str, width: int = 5) -> Callable[[str], Optional[str]]:
    """echo() for run_logged(): one line per fairseq-train log record (updates right-aligned in width)."""
    def echo(line: str):
        for stats in log_records([line], "train_inner"):
            return f"  [{system}] update {stats['num_updates']:>{width}}  loss {stats['loss']}  wps {stats.get('wps', '-')}"
        for stats in log_records([line], "valid"):
            return f"  [{system}] validation after update {stats['valid_num_updates']}: loss {stats['valid_loss']}"
        return None

    return echo


def parse_training_log(text: str) -> Dict[str, Optional[float]]:
    """fairseq-train's parameter count and median words/s (over its logging intervals)."""
    params = re.search(r"num\. (?:shared )?model params: ([\d,]+)", text)
    lines = text.splitlines()
    # fairseq's wps over each logging interval; short runs have only the epoch averages
    wps = [float(s["wps"]) for s in log_records(lines, "train_inner")] or [
        float(s["train_wps"]) for s in log_records(lines, "train")
    ]
    return {
        "params": int(params.group(1).replace(",", "")) if params else None,
        "wps": statistics.median(wps) if wps else None,
    }


def read_generate_output(text: str) -> Tuple[List[str], List[str]]:
    """Detokenised hypotheses (D-) and references (T-) of fairseq-generate, in corpus order."""
    hyps, refs = {}, {}
    for line in text.splitlines():
        if line.startswith("D-"):
            idx, _score, hyp = line[2:].split("\t", 2)
            hyps[int(idx)] = hyp
        elif line.startswith("T-"):
            idx, ref = line[2:].split("\t", 1)
            refs[int(idx)] = ref
    ids = sorted(refs)
    if sorted(hyps) != ids:
        raise RuntimeError(f"fairseq-generate returned {len(hyps)} hypotheses for {len(ids)} references")
    return [hyps[i] for i in ids], [refs[i] for i in ids]


def read_eval_lm_output(text: str) -> Tuple[Optional[float], Optional[float]]:
    """fairseq-eval-lm's (loss in base 2, perplexity); (None, None) without its result line."""
    m = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", text)
    return (float(m.group(1)), float(m.group(2))) if m else (None, None)


# ----------------------------------------------------------------------------- models without data


def make_dictionary(size: int):
    """A fairseq Dictionary of ``size`` symbols: the four special ones, then w0, w1, ..."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"w{i}")
    return d


def translation_dictionaries(src_size: int, tgt_size: int, joined: bool = False):
    """(source, target) dictionaries of the given sizes; one shared dictionary when ``joined``."""
    src = make_dictionary(src_size)
    return src, (src if joined else make_dictionary(tgt_size))


def parse_training_args(cli_args: Sequence[str], data: str = "/nonexistent-data"):
    """fairseq-train's own parsing of ``data`` + ``cli_args``: argparse, the architecture's
    defaults, then omegaconf. Returns (args, cfg); nothing reads ``data``."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import gpam_fairseq  # noqa: F401  (registers our models and architectures)

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, *cli_args])
    return args, convert_namespace_to_omegaconf(args)


def task_without_data(cfg, source_dictionary, target_dictionary=None):
    """The task of ``cfg.task`` (translation or language_modeling) with the given dictionaries
    instead of a data folder's (the target dictionary defaults to the source one)."""
    target_dictionary = target_dictionary if target_dictionary is not None else source_dictionary
    name = cfg.task._name
    if name == "language_modeling":
        from fairseq.tasks.language_modeling import LanguageModelingTask

        return LanguageModelingTask(cfg.task, source_dictionary, target_dictionary, targets=["future"])
    if name == "translation":
        from fairseq.tasks.translation import TranslationTask

        return TranslationTask(cfg.task, source_dictionary, target_dictionary)
    raise ValueError(f"--task {name}: only translation and language_modeling can be built without data")


def build_translation_model(arch: str, extra: Sequence[str] = (), src_size: int = IWSLT_DE,
                            tgt_size: int = IWSLT_EN, joined: bool = False):
    """The translation model fairseq-train builds for ``--arch arch *extra`` (de->en), with
    dictionaries of the given sizes (one shared dictionary when ``joined``)."""
    args, cfg = parse_training_args(["--task", "translation", "-s", "de", "-t", "en", "--arch", arch, *extra])
    return task_without_data(cfg, *translation_dictionaries(src_size, tgt_size, joined)).build_model(cfg.model)


def build_language_model(arch: str, extra: Sequence[str] = (), vocab: int = 1000):
    """The language model fairseq-train builds for ``--arch arch *extra``, with a dictionary of ``vocab`` symbols."""
    args, cfg = parse_training_args(["--task", "language_modeling", "--arch", arch, *extra])
    return task_without_data(cfg, make_dictionary(vocab)).build_model(cfg.model)
