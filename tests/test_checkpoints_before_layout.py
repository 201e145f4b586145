"""Checkpoints written by the flat layout of the package (before its modules moved into
subpackages) load with today's code, through fairseq-generate, fairseq-eval-lm and the hub, and
give what that code gave; their pickles name no module of the package."""

import os
import pickletools
import re
import sys
import zipfile

import pytest

from cli_runs import checked, command, hypotheses, run
from helpers import REPO, USER_DIR

FIXTURES = os.path.join(REPO, "tests", "fixtures", "checkpoints_before_layout")


def test_generate_gives_what_the_flat_layout_gave():
    proc = checked(run(command("fairseq-generate", os.path.join(FIXTURES, "nmt-bin"), "--user-dir", USER_DIR,
                               "--task", "translation", "--source-lang", "src", "--target-lang", "tgt",
                               "--path", os.path.join(FIXTURES, "nmt.pt"), "--gen-subset", "test", "--beam", "2",
                               "--batch-size", "8")))
    with open(os.path.join(FIXTURES, "generate_test_hypotheses.txt"), encoding="utf-8") as f:
        expected = hypotheses(f.read())
    got = hypotheses(proc.stdout)
    assert len(expected) == 16 and sorted(got) == sorted(expected)
    for i, (score, tokens) in expected.items():
        assert got[i][1] == tokens, i
        assert got[i][0] == pytest.approx(score, abs=1e-4), i


def test_eval_lm_gives_what_the_flat_layout_gave():
    proc = checked(run(command("fairseq-eval-lm", os.path.join(FIXTURES, "lm-bin"), "--user-dir", USER_DIR,
                               "--path", os.path.join(FIXTURES, "lm.pt"), "--gen-subset", "test",
                               "--tokens-per-sample", "16")))
    loss = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", proc.stdout + proc.stderr)
    assert loss, proc.stderr[-2000:]
    assert (loss.group(1), loss.group(2)) == ("4.5522", "23.46")


def test_hub_translates_as_the_flat_layout_did():
    code = ("import gpam_fairseq\n"
            "from fairseq.models.transformer import TransformerModel\n"
            f"m = TransformerModel.from_pretrained({FIXTURES!r}, checkpoint_file='nmt.pt',"
            f" data_name_or_path={os.path.join(FIXTURES, 'nmt-bin')!r}, source_lang='src', target_lang='tgt')\n"
            "print(repr(m.translate('w3 w5 w7', beam=2)))\n")
    proc = checked(run([sys.executable, "-c", code]))
    assert proc.stdout.strip().splitlines()[-1] == "'Luz'"


def test_their_pickles_name_no_module_of_the_package():
    """What the checkpoints need of today's code is the parameter names (above), not modules:
    their pickles reference torch, collections and argparse only, so the modules' former flat
    names need no forwarding."""
    for name in ("nmt.pt", "lm.pt"):
        with zipfile.ZipFile(os.path.join(FIXTURES, name)) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        strings, referenced = [], set()
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "GLOBAL":
                referenced.add(arg.split(" ")[0])
            elif op.name == "STACK_GLOBAL":
                referenced.add(strings[-2])
        assert referenced and {m.split(".")[0] for m in referenced} <= {"torch", "collections", "argparse"}, (name, referenced)
