"""Checkpoints written by the flat layout of the package (before its modules moved into
subpackages) load with today's code, through fairseq-generate, fairseq-eval-lm and the hub, and
give what that code gave; the modules' former names still import, as the same modules."""

import importlib
import os
import re
import subprocess
import sys

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


def test_former_module_names_import_as_the_moved_modules():
    from gpam_fairseq._moved import MOVED

    assert len(MOVED) == 12
    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    # the forms a user's code may hold, in a fresh interpreter (no module imported before)
    code = ("from gpam_fairseq.checkpoints import load_models\n"
            "from gpam_fairseq import fairseq_tools, compat\n"
            "import gpam_fairseq.collapse_analysis as ca\n"
            "from gpam_fairseq.measurement import collapse\n"
            "assert ca is collapse and fairseq_tools.USER_DIR.endswith('gpam_fairseq')\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
