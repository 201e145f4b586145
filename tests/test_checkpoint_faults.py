"""A checkpoint that cannot be used stops every loader with one line naming the file and the fault.

Faults: a missing file, one cut off while being written (the first half of a real checkpoint),
a text file renamed .pt, an empty file, and the wrong model: a language model given to a
translation task (which fairseq-generate would otherwise happily "translate" with), a
translation model given to fairseq-eval-lm, and a checkpoint of a model that nothing in this
run registers (another plugin's). Loaders: fairseq-generate and fairseq-eval-lm (through
fairseq's own checkpoint_utils, with --user-dir), fairseq-train resuming from a cut-off
checkpoint_last.pt (the line also names the intact checkpoint to resume from),
scripts/average_checkpoints.py and scripts/analyze_collapse.py (exit status 2 and
``<program>: error: <file>: <fault>`` as the last line, no traceback, nothing written), and
the hub (``from_pretrained`` of both model classes: CheckpointError, whose message is that
line's part after ``error:``).
"""

import os

import pytest
import torch

from cli_runs import NMT_ARCH, TRAIN, command, describe, last_line, run_all, tiny_runs
from gpam_fairseq.checkpointing.checkpoints import CheckpointError, file_problem
from gpam_fairseq.models.transformer_gpam import TransformerGPAMModel
from gpam_fairseq.models.transformer_lm_gpam import TransformerLanguageModelGPAM
from helpers import REPO, USER_DIR

AVERAGE = os.path.join(REPO, "scripts", "average_checkpoints.py")
ANALYZE = os.path.join(REPO, "scripts", "analyze_collapse.py")

# what each fault's line says after "<file>: "
SAYS = {
    "missing": "no such file",
    "truncated": "truncated (",
    "text": "not a torch checkpoint: a text file beginning 'epoch 1 | loss 3.2",
    "empty": "empty file (0 bytes), not a checkpoint",
    "lm_for_translation": "holds a language model (transformer_lm_gpam), but this run's task is translation",
    "nmt_for_language_model": "holds a translation (encoder-decoder) model (transformer_gpam), but this run's task is "
                              "language_modeling",
    "other_plugin_nmt": "holds a model named 'other_plugin_transformer', which neither fairseq nor the loaded plugins "
                        "register; load it with the --user-dir of the plugin that trained it",
    "other_plugin_lm": "holds a model named 'other_plugin_lm', which neither fairseq nor the loaded plugins register",
}


def other_plugin_checkpoint(src, dst, name):
    """A real checkpoint whose model is recorded under a name nothing here registers, as a
    checkpoint of another --user-dir plugin is."""
    state = torch.load(src, map_location="cpu")  # our allowlist (the test imported gpam_fairseq)
    model = state["cfg"]["model"]
    if isinstance(model, dict):  # dataclass model (LM)
        model["_name"] = name
    else:  # argparse model (NMT): its architecture names it
        model.arch = model._name = name
    torch.save(state, dst)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory.mktemp("checkpoint_faults"))
    bad = os.path.join(runs["root"], "bad")
    os.makedirs(bad)
    paths = {"missing": os.path.join(bad, "missing.pt"), "truncated": os.path.join(bad, "truncated.pt"),
             "text": os.path.join(bad, "log_renamed.pt"), "empty": os.path.join(bad, "empty.pt"),
             "other_plugin_nmt": os.path.join(bad, "other_plugin_nmt.pt"),
             "other_plugin_lm": os.path.join(bad, "other_plugin_lm.pt"),
             "lm_for_translation": runs["lm_ckpt"], "nmt_for_language_model": runs["nmt_ckpt"]}
    with open(runs["nmt_ckpt"], "rb") as f:
        whole = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(whole[: len(whole) // 2])
    with open(paths["text"], "w") as f:
        f.write("epoch 1 | loss 3.2\nepoch 2 | loss 2.9\n")
    open(paths["empty"], "wb").close()
    # a save folder whose checkpoint_last.pt was cut off (by a run without the plugin's atomic saves)
    resume = os.path.join(runs["root"], "resume")
    os.makedirs(resume)
    paths["intact"] = os.path.join(resume, "checkpoint_1_2.pt")
    paths["truncated_last"] = os.path.join(resume, "checkpoint_last.pt")
    with open(paths["intact"], "wb") as f:
        f.write(whole)
    os.utime(paths["intact"], (1e9, 1e9))  # written before checkpoint_last.pt
    with open(paths["truncated_last"], "wb") as f:
        f.write(whole[: len(whole) // 3])
    other_plugin_checkpoint(runs["nmt_ckpt"], paths["other_plugin_nmt"], "other_plugin_transformer")
    other_plugin_checkpoint(runs["lm_ckpt"], paths["other_plugin_lm"], "other_plugin_lm")
    return runs, paths


# (program, fault): argv after the program's name; {path} is the faulty file, {out} a folder
CASES = {
    ("fairseq-generate", "missing"): ["{nmt_bin}", "--path", "{path}"],
    ("fairseq-generate", "truncated"): ["{nmt_bin}", "--path", "{path}"],
    ("fairseq-generate", "text"): ["{nmt_bin}", "--path", "{path}"],
    ("fairseq-generate", "empty"): ["{nmt_bin}", "--path", "{path}"],
    ("fairseq-generate", "lm_for_translation"): ["{nmt_bin}", "--path", "{path}"],
    ("fairseq-generate", "other_plugin_nmt"): ["{nmt_bin}", "--path", "{path}"],
    ("fairseq-eval-lm", "truncated"): ["{lm_bin}", "--path", "{path}"],
    ("fairseq-eval-lm", "nmt_for_language_model"): ["{lm_bin}", "--path", "{path}"],
    ("fairseq-eval-lm", "other_plugin_lm"): ["{lm_bin}", "--path", "{path}"],
    ("average_checkpoints.py", "missing"): ["--inputs", "{nmt_ckpt}", "{path}", "--output", "{out}/avg.pt"],
    ("average_checkpoints.py", "text"): ["--inputs", "{nmt_ckpt}", "{path}", "--output", "{out}/avg.pt"],
    ("average_checkpoints.py", "empty"): ["--inputs", "{path}", "{nmt_ckpt}", "--output", "{out}/avg.pt"],
    ("analyze_collapse.py", "missing"): ["--checkpoint", "{path}", "--out-prefix", "{out}/collapse"],
    ("analyze_collapse.py", "truncated"): ["--checkpoint", "{nmt_ckpt}", "{path}", "--out-prefix", "{out}/collapse"],
    ("analyze_collapse.py", "other_plugin_lm"): ["--checkpoint", "{path}", "--out-prefix", "{out}/collapse"],
}
SCRIPTS = {"average_checkpoints.py": AVERAGE, "analyze_collapse.py": ANALYZE}


def case_id(program, fault):
    return f"{program}-{fault}"


@pytest.fixture(scope="module")
def results(files):
    runs, paths = files
    jobs = {}
    for (program, fault), template in CASES.items():
        out = os.path.join(runs["root"], "out", case_id(program, fault))
        os.makedirs(out)
        args = [a.format(path=paths[fault], out=out, **runs) for a in template]
        if program in SCRIPTS:
            argv = command(SCRIPTS[program], *args)
        else:
            argv = command(program, args[0], "--user-dir", USER_DIR, *args[1:])
        jobs[program, fault] = dict(argv=argv)
    jobs["fairseq-train", "resume"] = dict(argv=command(
        "fairseq-train", runs["nmt_bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "4",
        "--save-dir", os.path.dirname(paths["truncated_last"])))
    return run_all(jobs)


@pytest.mark.parametrize("program,fault", list(CASES), ids=[case_id(*c) for c in CASES])
def test_console_scripts_stop_with_one_line_naming_the_file(files, results, program, fault):
    runs, paths = files
    proc = results[program, fault]
    line = last_line(proc.stderr)
    if (program, fault) == ("average_checkpoints.py", "missing"):  # checked by its argument parser
        assert line == f"average_checkpoints.py: error: --inputs {paths[fault]}: no such file", describe(proc)
    else:
        assert line.startswith(f"{program}: error: {paths[fault]}: {SAYS[fault]}"), describe(proc)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert not os.listdir(os.path.join(runs["root"], "out", case_id(program, fault))), "wrote output on failure"
    if program == "fairseq-generate":
        assert "H-" not in proc.stdout  # no hypothesis from a model that should not have loaded


def test_fairseq_train_resuming_from_a_truncated_checkpoint_names_it_and_the_way_out(files, results):
    _, paths = files
    proc = results["fairseq-train", "resume"]
    line = last_line(proc.stderr)
    assert line.startswith(f"fairseq-train: error: {paths['truncated_last']}: {SAYS['truncated']}"), describe(proc)
    assert line.endswith(f"; the newest intact checkpoint next to it is {paths['intact']}: add --restore-file "
                         f"{paths['intact']} to resume from it"), describe(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert sorted(os.listdir(os.path.dirname(paths["intact"]))) == ["checkpoint_1_2.pt", "checkpoint_last.pt"]


HUB = {
    "nmt": (TransformerGPAMModel, "nmt_bin", dict(source_lang="src", target_lang="tgt"),
            ["missing", "truncated", "text", "empty", "lm_for_translation", "other_plugin_nmt"]),
    "lm": (TransformerLanguageModelGPAM, "lm_bin", {},
           ["missing", "truncated", "text", "empty", "nmt_for_language_model", "other_plugin_lm"]),
}
HUB_SAYS = {  # the hub checks the class asked for; it has no task of its own to compare with
    "lm_for_translation": "holds a transformer_lm_gpam model (TransformerLanguageModelGPAM), not a TransformerGPAMModel; "
                          "load it with TransformerLanguageModelGPAM.from_pretrained",
    "nmt_for_language_model": "holds a transformer_gpam model (TransformerGPAMModel), not a "
                              "TransformerLanguageModelGPAM; load it with TransformerGPAMModel.from_pretrained",
}


@pytest.mark.parametrize("kind,fault", [(k, f) for k, (_, _, _, faults) in HUB.items() for f in faults])
def test_hub_raises_checkpoint_error_naming_the_file(files, kind, fault):
    runs, paths = files
    cls, data, extra, _ = HUB[kind]
    path = paths[fault]
    with pytest.raises(CheckpointError) as err:
        cls.from_pretrained(os.path.dirname(path), checkpoint_file=os.path.basename(path),
                            data_name_or_path=runs[data], **extra)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {HUB_SAYS.get(fault, SAYS[fault])}"), message


def test_hub_missing_folder(files):
    runs, _ = files
    folder = os.path.join(runs["root"], "no-such-folder")
    with pytest.raises(CheckpointError, match=f"^{folder}: no such directory$"):
        TransformerGPAMModel.from_pretrained(folder, checkpoint_file="checkpoint_last.pt",
                                             data_name_or_path=runs["nmt_bin"], source_lang="src", target_lang="tgt")


@pytest.mark.parametrize("kind", ["nmt", "lm"])
def test_hub_loads_the_real_checkpoints(files, kind):
    """The control: the same calls on the intact checkpoints load the models."""
    runs, _ = files
    cls, data, extra, _ = HUB[kind]
    path = runs[f"{kind}_ckpt"]
    hub = cls.from_pretrained(os.path.dirname(path), checkpoint_file=os.path.basename(path),
                              data_name_or_path=runs[data], **extra)
    assert isinstance(hub.models[0], cls)
    assert file_problem(path) is None
