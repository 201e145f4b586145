"""Running the real command lines (fairseq's console scripts, torchrun, our scripts) as a user
would, several side by side, on tiny data and tiny checkpoints made once per test module."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from helpers import REPO, USER_DIR
from gpam_fairseq.recipes.synthetic_corpus import write_corpus

BIN = os.path.dirname(sys.executable)
ENV = {k: v for k, v in os.environ.items() if k not in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "GPAM_DEBUG")}
ENV["PATH"] = BIN + os.pathsep + ENV.get("PATH", "")
ENV["OMP_NUM_THREADS"] = "1"
PARALLEL = 4  # processes at a time: each spends most of its few seconds importing torch and fairseq

NMT_ARCH = ["--task", "translation", "--arch", "transformer_gpam_iwslt_de_en", "--encoder-layers", "1",
            "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
            "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16"]
LM_ARCH = ["--task", "language_modeling", "--arch", "transformer_lm_gpam", "--decoder-layers", "1",
           "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "16", "--tokens-per-sample", "16",
           "--sample-break-mode", "none"]
TRAIN = ["--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "512", "--required-batch-size-multiple", "1",
         "--num-workers", "0"]


def command(name, *args):
    """argv of a console script of this venv (fairseq's, torchrun) or, for a .py, of python."""
    if name.endswith(".py"):
        return [sys.executable, name, *map(str, args)]
    return [os.path.join(BIN, name), *map(str, args)]


def run(argv, stdin=None, env=None, cwd=REPO, timeout=300):
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env or ENV, cwd=cwd,
                          timeout=timeout)


def run_all(jobs):
    """{name: dict(argv=..., stdin=..., env=..., cwd=...)} -> {name: CompletedProcess}, PARALLEL at a time."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(run, **job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def hypotheses(text):
    """{sentence id: (score, tokens)} of fairseq-generate's H- lines."""
    found = {}
    for line in text.splitlines():
        if line.startswith("H-"):
            key, score, tokens = line.split("\t")
            found[int(key[2:])] = (float(score), tokens)
    return found


def last_line(text):
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def describe(proc):
    return f"exit status {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def checked(proc):
    assert proc.returncode == 0, describe(proc)
    return proc


def tiny_runs(root, checkpoints=True, n_train=100):
    """Data folders (translation src->tgt, language model) and, if asked, a checkpoint of each
    model trained for 2 updates. Returns their paths."""
    raw = os.path.join(root, "raw")
    write_corpus(raw, n_train=n_train, n_valid=16, n_test=16, vocab=20, max_len=6)
    paths = {"root": str(root), "nmt_bin": os.path.join(root, "nmt-bin"), "lm_bin": os.path.join(root, "lm-bin")}
    for proc in run_all({
        "nmt": dict(argv=command("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref",
                                 f"{raw}/train", "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test",
                                 "--destdir", paths["nmt_bin"], "--workers", "1")),
        "lm": dict(argv=command("fairseq-preprocess", "--only-source", "--trainpref", f"{raw}/train.tgt",
                                "--validpref", f"{raw}/valid.tgt", "--testpref", f"{raw}/test.tgt",
                                "--destdir", paths["lm_bin"], "--workers", "1")),
    }).values():
        checked(proc)
    if checkpoints:
        jobs = {}
        for kind, arch in (("nmt", NMT_ARCH), ("lm", LM_ARCH)):
            save_dir = os.path.join(root, f"{kind}-ckpt")
            jobs[kind] = dict(argv=command("fairseq-train", paths[f"{kind}_bin"], "--user-dir", USER_DIR, *arch, *TRAIN,
                                           "--max-update", "2", "--no-epoch-checkpoints", "--save-dir", save_dir))
            paths[f"{kind}_ckpt"] = os.path.join(save_dir, "checkpoint_last.pt")
        for proc in run_all(jobs).values():
            checked(proc)
    return paths
