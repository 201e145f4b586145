"""A bad GPAM option stops every program with one line, ``<program>: error: <flag>: ...``, and
exit status 2, as argparse does; ``GPAM_DEBUG=1`` brings the traceback back.

Through the real command lines: fairseq-train (the flag on its command line), fairseq-generate,
fairseq-interactive and fairseq-eval-lm (the value through ``--model-overrides`` onto a real
checkpoint), fairseq-hydra-train (a hydra override of our YAML config), and torchrun running
fairseq's train module (where torchrun's launcher, another process, adds its failure summary
after our line). Then what the hook must keep: output flushed and atexit handlers run before
exit status 2, other exceptions untouched, an interactive session not ended, and the error of
a child started by torch.multiprocessing.spawn (fairseq's launcher with several GPUs)
reported by the parent.
"""

import os
import re
import sys
import textwrap

import pytest

from cli_runs import ENV, NMT_ARCH, TRAIN, command, describe, last_line, run, run_all, tiny_runs
from helpers import REPO, USER_DIR

MESSAGE = "--gpam-lambda-neg: must be a finite number >= 0, got -0.3"
OVERRIDE = "{'gpam_lambda_neg': -0.3}"
IWSLT_HYDRA = os.path.join(REPO, "examples", "iwslt14", "hydra")
PROGRAMS = ["fairseq-train", "fairseq-generate", "fairseq-interactive", "fairseq-eval-lm", "fairseq-hydra-train",
            "torchrun"]


def jobs(runs, debug):
    env = dict(ENV, GPAM_DEBUG="1") if debug else ENV
    hydra_cwd = os.path.join(runs["root"], "hydra-debug" if debug else "hydra")
    os.makedirs(hydra_cwd, exist_ok=True)  # hydra writes its outputs/ folder there
    train = [runs["nmt_bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "1", "--no-save",
             "--gpam-lambda-neg", "-0.3"]
    return {
        "fairseq-train": dict(argv=command("fairseq-train", *train), env=env),
        "fairseq-generate": dict(argv=command("fairseq-generate", runs["nmt_bin"], "--user-dir", USER_DIR, "--path",
                                              runs["nmt_ckpt"], "--model-overrides", OVERRIDE), env=env),
        "fairseq-interactive": dict(argv=command("fairseq-interactive", runs["nmt_bin"], "--user-dir", USER_DIR,
                                                 "--path", runs["nmt_ckpt"], "--model-overrides", OVERRIDE),
                                    stdin="w1 w2 w3\n", env=env),
        "fairseq-eval-lm": dict(argv=command("fairseq-eval-lm", runs["lm_bin"], "--user-dir", USER_DIR, "--path",
                                             runs["lm_ckpt"], "--model-overrides", OVERRIDE), env=env),
        "fairseq-hydra-train": dict(argv=command(
            "fairseq-hydra-train", "--config-dir", IWSLT_HYDRA, "--config-name", "transformer_gpam_iwslt_de_en",
            f"common.user_dir={USER_DIR}", "common.fp16=false", "common.tensorboard_logdir=null",
            f"task.data={runs['nmt_bin']}", "task.source_lang=src", "task.target_lang=tgt", "optimization.max_update=1",
            "checkpoint.no_save=true", "+model.encoder_layers=1", "+model.decoder_layers=1",
            "model.gpam_lambda_neg=-0.3"), env=env, cwd=hydra_cwd),
        # --standalone: a free port, so that parallel runs do not collide
        "torchrun": dict(argv=command("torchrun", "--standalone", "--nproc-per-node", "1", "-m", "fairseq_cli.train",
                                      *train), env=env),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory.mktemp("user_errors"))
    both = {**{(name, False): job for name, job in jobs(runs, False).items()},
            **{(name, True): job for name, job in jobs(runs, True).items()}}
    return run_all(both)


@pytest.mark.parametrize("program", [p for p in PROGRAMS if p != "torchrun"])
def test_bad_option_ends_with_one_line_and_status_2(results, program):
    proc = results[program, False]
    assert last_line(proc.stderr) == f"{program}: error: {MESSAGE}", describe(proc)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, describe(proc)


@pytest.mark.parametrize("program", [p for p in PROGRAMS if p != "torchrun"])
def test_gpam_debug_brings_the_traceback_back(results, program):
    proc = results[program, True]
    assert proc.returncode == 1, describe(proc)
    assert "Traceback (most recent call last)" in proc.stderr, describe(proc)
    assert f"gpam_fairseq.attention.config.GPAMConfigError: {MESSAGE}" in proc.stderr, describe(proc)
    assert f"error: {MESSAGE}" not in proc.stderr


def torchrun_summary(stderr):
    """The worker's lines and torchrun's own: the launcher's log and failure summary come after."""
    worker, _, launcher = stderr.partition("torch/distributed/elastic/multiprocessing/api.py")
    return worker, launcher


def test_torchrun_shows_the_line_and_its_summary_quotes_it(results):
    proc = results["torchrun", False]
    worker, launcher = torchrun_summary(proc.stderr)
    line = f"train.py: error: {MESSAGE}"  # the worker runs fairseq_cli/train.py: argparse's program name
    assert last_line(worker.rsplit("\n", 1)[0]) == line, describe(proc)
    assert "failed (exitcode: 2)" in launcher
    # torchrun's summary quotes the worker's error file, which the worker wrote
    assert re.search(r"exitcode\s*: 2 ", launcher) and f"traceback : {line}" in launcher, describe(proc)
    # what torchrun itself prints, outside our control: its ChildFailedError traceback (frames of
    # torchrun only, none of the worker) and exit status 1
    assert proc.returncode == 1
    assert proc.stderr.count("Traceback (most recent call last)") == 1
    assert "gpam_fairseq" not in launcher.split("ChildFailedError", 1)[0]
    assert "GPAMConfigError" not in proc.stderr


def test_torchrun_with_gpam_debug_shows_the_workers_traceback(results):
    proc = results["torchrun", True]
    worker, _ = torchrun_summary(proc.stderr)
    assert "Traceback (most recent call last)" in worker and f"GPAMConfigError: {MESSAGE}" in worker, describe(proc)
    assert "failed (exitcode: 1)" in proc.stderr


# ----------------------------------------------------------------------------- the hook itself

PROGRAM = """
import atexit, os, sys
import gpam_fairseq
from gpam_fairseq.options import GPAMConfigError

atexit.register(lambda: open(sys.argv[2] + ".atexit", "w").write("ran"))


def main():
    sys.stdout.write("printed before the error, not flushed")
    unclosed = open(sys.argv[2], "w")
    unclosed.write("written before the error, not flushed")
    raise {error}


main()
"""


def write_program(folder, error):
    path = os.path.join(folder, "prog.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(PROGRAM.format(error=error)))
    return path


def test_exit_status_2_keeps_output_and_runs_atexit(tmp_path):
    prog = write_program(tmp_path, "GPAMConfigError('--gpam-blocks: empty; give a comma list')")
    out = str(tmp_path / "out.txt")
    proc = run([*command(prog), "unused", out])
    assert proc.returncode == 2, describe(proc)
    assert last_line(proc.stderr) == "prog.py: error: --gpam-blocks: empty; give a comma list"
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "printed before the error, not flushed"
    with open(out) as f:
        assert f.read() == "written before the error, not flushed"
    assert os.path.exists(out + ".atexit")


def test_other_exceptions_keep_their_traceback_and_status(tmp_path):
    prog = write_program(tmp_path, "KeyError('not ours')")
    proc = run([*command(prog), "unused", str(tmp_path / "out.txt")])
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and last_line(proc.stderr) == "KeyError: 'not ours'"


def test_interactive_session_is_not_ended(tmp_path):
    """In an interactive interpreter our error is shown as usual and the session goes on."""
    code = "import gpam_fairseq; from gpam_fairseq.options import GPAMConfigError; raise GPAMConfigError('x')"
    proc = run([sys.executable, "-i", "-c", code], stdin="print('still here')\n")
    assert "Traceback (most recent call last)" in proc.stderr and "GPAMConfigError: x" in proc.stderr
    assert "still here" in proc.stdout


SPAWN = """
import time
import torch.multiprocessing as mp
import gpam_fairseq
from gpam_fairseq.options import GPAMConfigError


def child(rank):
    if rank == 1:
        raise GPAMConfigError("--gpam-lambda-neg: must be a finite number >= 0, got -0.3")
    time.sleep(30)  # the parent stops this one when the other fails


if __name__ == "__main__":
    mp.spawn(child, nprocs=2, join=True)
"""


def test_error_of_a_spawned_child_is_reported_by_the_parent(tmp_path):
    """fairseq's call_main starts one process per GPU with torch.multiprocessing.spawn; the
    child's exception comes back to the parent as text (ProcessRaisedException)."""
    prog = tmp_path / "spawned.py"
    prog.write_text(SPAWN)
    proc = run(command(str(prog)))
    assert last_line(proc.stderr) == f"spawned.py: error: {MESSAGE}", describe(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
