"""Safe loading: the plugin's allowlist is exactly what fairseq pickles, and nothing else loads.

torch >= 2.6 already refuses a pickle that calls ``os.system``; these tests guard against the
plugin weakening that (no weights_only=False, no global beyond fairseq's), through every loader: fairseq's own
(``checkpoint_utils``, fairseq-generate with ``--user-dir``), ours (``gpam_fairseq.checkpointing.checkpoints``,
which every script of the project uses), hub ``from_pretrained``, and the ``torch.load`` of a
distributed broadcast. Each malicious file would create a side-effect file if anything in it
ran; the file must never appear (and a control load with ``weights_only=False`` shows that
it would).
"""

import fractions
import glob
import io
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.serialization as serialization

import gpam_fairseq  # noqa: F401  (what --user-dir does: installs the allowlist)
from gpam_fairseq.checkpointing.checkpoints import CheckpointRefused, load_models, load_state
from gpam_fairseq.fairseq_glue.compat import CHECKPOINT_SAFE_GLOBALS
from helpers import REPO, USER_DIR
from gpam_fairseq.recipes.synthetic_corpus import write_corpus
import test_cli
from test_cli import BIN, run_cli

ENV = dict(test_cli.ENV, OMP_NUM_THREADS="1")

# The allowlist as docs/compatibility.md's "Safe loading" section lists it.
DOCUMENTED_ALLOWLIST = {
    "argparse.Namespace",  # NMT checkpoints: their options
    # the broadcast_object payload of a distributed resume:
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.nodes.AnyNode",
    "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata",
    "typing.Any",
    "builtins.dict",
    "builtins.list",
    "builtins.int",
    "collections.defaultdict",
    "fairseq.distributed.utils._TensorPlaceholder",
}


def qualified(g):
    return f"{g.__module__}.{g.__qualname__}"


class RunsCommand:
    """Pickles as a call to os.system: loading it unsafely runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class RunsExec:
    """Pickles as a call to builtins.exec."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def cli(name, *args, check=True):
    proc = run_cli(name, *args, env=ENV)
    if check and proc.returncode != 0:
        pytest.fail(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Real checkpoints of an NMT and an LM model (2 updates each, trained side by side)."""
    root = tmp_path_factory.mktemp("security")
    raw = str(root / "raw")
    write_corpus(raw, n_train=200, n_valid=16, n_test=16, vocab=20, max_len=6)
    nmt_bin, lm_bin = str(root / "nmt-bin"), str(root / "lm-bin")
    cli("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", f"{raw}/train",
        "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test", "--destdir", nmt_bin, "--workers", "1")
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{raw}/train.tgt", "--validpref", f"{raw}/valid.tgt",
        "--destdir", lm_bin, "--workers", "1")
    common = ["--user-dir", USER_DIR, "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "512", "--max-update", "2",
              "--required-batch-size-multiple", "1", "--no-epoch-checkpoints", "--gpam-trainable-lambda"]
    runs = {
        "nmt": [nmt_bin, "--arch", "transformer_gpam_iwslt_de_en", "--encoder-layers", "1", "--decoder-layers", "1",
                "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
                "--decoder-ffn-embed-dim", "16"],
        "lm": [lm_bin, "--task", "language_modeling", "--arch", "transformer_lm_gpam", "--decoder-layers", "1",
               "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "16", "--tokens-per-sample", "16"],
    }
    procs = {
        kind: subprocess.Popen([os.path.join(BIN, "fairseq-train"), *args, *common, "--save-dir", str(root / kind)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
        for kind, args in runs.items()
    }
    for kind, proc in procs.items():
        out = proc.communicate()[0]
        assert proc.returncode == 0, out[-4000:]
    return {"root": root, "nmt_bin": nmt_bin, "lm_bin": lm_bin, "nmt": str(root / "nmt" / "checkpoint_last.pt"),
            "lm": str(root / "lm" / "checkpoint_last.pt")}


@pytest.fixture
def side_effect(tmp_path):
    path = tmp_path / "side_effect_was_executed"
    yield path
    assert not path.exists(), "a checkpoint's pickle ran code"


def malicious_files(real, folder, side_effect):
    """{kind: path}: payloads that would create side_effect if anything in them ran."""
    folder.mkdir(exist_ok=True)
    touch = f"touch {side_effect}"
    files = {}
    files["os_system"] = folder / "os_system.pt"
    torch.save({"model": {}, "payload": RunsCommand(touch)}, files["os_system"])
    files["exec"] = folder / "exec.pt"
    torch.save({"model": {}, "payload": RunsExec(f"open({str(side_effect)!r}, 'w').close()")}, files["exec"])
    # a real checkpoint of ours, with the payload hidden deep in its extra state
    state = torch.load(real["nmt"], map_location="cpu")  # weights_only: our allowlist
    state["extra_state"]["metrics"] = {"default": [RunsCommand(touch)]}
    files["hidden_in_real_checkpoint"] = folder / "checkpoint_hidden.pt"
    torch.save(state, files["hidden_in_real_checkpoint"])
    # not code at all, just a type outside the allowlist
    files["other_global"] = folder / "fraction.pt"
    torch.save({"model": {}, "x": fractions.Fraction(1, 3)}, files["other_global"])
    return {k: str(v) for k, v in files.items()}


OFFENDING = {"os_system": "posix.system", "exec": "builtins.exec", "hidden_in_real_checkpoint": "posix.system",
             "other_global": "fractions.Fraction"}


def test_the_payload_would_run_if_loaded_unsafely(real, tmp_path):
    """The control: without weights_only the payload does run (so the other tests can see it)."""
    marker = tmp_path / "ran"
    files = malicious_files(real, tmp_path / "evil", marker)
    torch.load(files["hidden_in_real_checkpoint"], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", list(OFFENDING))
def test_our_loaders_refuse_with_one_line_naming_file_and_global(real, tmp_path, side_effect, kind):
    path = malicious_files(real, tmp_path / "evil", side_effect)[kind]
    for load in (lambda: load_state(path), lambda: load_models([real["nmt"], path])):
        with pytest.raises(CheckpointRefused) as err:
            load()
        message = str(err.value)
        assert "\n" not in message
        assert f"refused to load {path}" in message and OFFENDING[kind] in message
        assert "nothing in it was executed" in message


@pytest.mark.parametrize("kind", list(OFFENDING))
def test_fairseq_loaders_refuse_with_the_plugin_imported(real, tmp_path, side_effect, kind):
    from fairseq import checkpoint_utils

    from gpam_fairseq.models.transformer_gpam import TransformerGPAMModel

    path = malicious_files(real, tmp_path / "evil", side_effect)[kind]
    # torch's weights_only unpickler refuses; the plugin's wrapper only rewords it in one line
    # (torch names a builtin without its module: "exec")
    refused = re.escape(f"refused to load {path}: it pickles the global ") + r"(\w+\.)?" + \
        re.escape(OFFENDING[kind].rsplit(".", 1)[-1])
    with pytest.raises(CheckpointRefused, match=refused) as err:
        checkpoint_utils.load_checkpoint_to_cpu(path)
    assert isinstance(err.value, pickle.UnpicklingError) and "Weights only load failed" in str(err.value.__cause__)
    with pytest.raises(CheckpointRefused, match=refused):
        TransformerGPAMModel.from_pretrained(os.path.dirname(path), checkpoint_file=os.path.basename(path),
                                             data_name_or_path=real["nmt_bin"], source_lang="src", target_lang="tgt")
    # what fairseq's broadcast_object does with the bytes rank 0 sends
    with open(path, "rb") as f:
        payload = io.BytesIO(f.read())
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(payload, map_location="cpu")


def test_fairseq_generate_refuses_with_user_dir(real, tmp_path, side_effect):
    path = malicious_files(real, tmp_path / "evil", side_effect)["hidden_in_real_checkpoint"]
    proc = cli("fairseq-generate", real["nmt_bin"], "--user-dir", USER_DIR, "--path", path, "--gen-subset", "test",
               "--beam", "2", "--required-batch-size-multiple", "1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"fairseq-generate: error: refused to load {path}: it pickles the global posix.system")
    assert "Traceback" not in proc.stderr
    assert not re.search(r"^H-\d+", proc.stdout, re.M)


def test_allowlist_is_exactly_the_documented_set():
    assert {qualified(g) for g in CHECKPOINT_SAFE_GLOBALS} == DOCUMENTED_ALLOWLIST
    code = (
        "import torch.serialization as s\n"
        "before = set(s.get_safe_globals())\n"
        "import gpam_fairseq\n"
        "print(sorted(f'{g.__module__}.{g.__qualname__}' for g in set(s.get_safe_globals()) - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, check=True).stdout
    assert out.strip().splitlines()[-1] == str(sorted(DOCUMENTED_ALLOWLIST))


def broadcast_payload(state):
    """The bytes fairseq's broadcast_object sends from rank 0 (tensors split off first)."""
    from fairseq.distributed.utils import _split_tensors_from_obj

    tensors = []
    obj = _split_tensors_from_obj(state, tensors)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer, tensors


def test_allowlist_is_what_fairseq_pickles(real):
    """Re-derive the list: the globals of real checkpoints and of their broadcast payloads."""
    from fairseq import checkpoint_utils

    found = set()
    saved = serialization.get_safe_globals()
    serialization.clear_safe_globals()  # torch's defaults only, as without the plugin
    try:
        for kind in ("nmt", "lm"):
            found |= set(serialization.get_unsafe_globals_in_checkpoint(real[kind]))
            with serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
                state = checkpoint_utils.load_checkpoint_to_cpu(real[kind])  # as rank 0 does
            buffer, _ = broadcast_payload(state)
            found |= set(serialization.get_unsafe_globals_in_checkpoint(buffer))
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(saved)
    found = {"builtins." + g.split(".", 1)[1] if g.startswith("__builtin__.") else g for g in found}
    assert found == DOCUMENTED_ALLOWLIST


@pytest.mark.parametrize("kind", ["nmt", "lm"])
def test_broadcast_payload_round_trips_under_weights_only(real, kind):
    """What ranks > 0 receive when a distributed run resumes (broadcast_object's payload) loads, and is equal."""
    from fairseq.distributed.utils import _put_tensors_in_obj

    state = load_state(real[kind])
    buffer, tensors = broadcast_payload(state)
    received = _put_tensors_in_obj(torch.load(buffer, map_location="cpu"), tensors)  # weights_only=True
    assert received["cfg"] == state["cfg"]
    assert received["cfg"].model._name == state["cfg"].model._name
    for k, v in state["model"].items():
        assert torch.equal(received["model"][k], v)


def test_project_code_loads_checkpoints_only_through_gpam_fairseq_checkpoints():
    """No script or module of ours calls torch.load itself or turns weights_only off."""
    offenders = []
    for path in glob.glob(os.path.join(REPO, "gpam_fairseq", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "scripts", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "examples", "**", "*.py"), recursive=True):
        if os.path.basename(path) == "checkpoints.py":
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                code = line.split("#", 1)[0]
                if re.search(r"torch\.load\(|weights_only\s*=\s*False|TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD([\"']\s*(\]\s*=|,)|=)", code):
                    offenders.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
    assert not offenders, "load checkpoints with gpam_fairseq.checkpointing.checkpoints.load_state/load_models:\n" + "\n".join(offenders)


def test_loading_without_user_dir_fails_with_the_messages_the_readme_quotes(real):
    """Without --user-dir fairseq fails before any code of ours runs; docs/compatibility.md's troubleshooting
    section quotes these exact lines, so they are checked here."""
    env = {**ENV, "PYTHONPATH": ""}
    procs = {
        "nmt": subprocess.Popen([os.path.join(BIN, "fairseq-generate"), real["nmt_bin"], "--path", real["nmt"],
                                 "--gen-subset", "test", "--beam", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=str(real["root"])),
        "lm": subprocess.Popen([os.path.join(BIN, "fairseq-eval-lm"), real["lm_bin"], "--path", real["lm"]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(real["root"])),
    }
    errs = {kind: proc.communicate()[1] for kind, proc in procs.items()}
    assert procs["nmt"].returncode != 0 and procs["lm"].returncode != 0
    assert "_pickle.UnpicklingError: Weights only load failed." in errs["nmt"]
    assert ("Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default"
            in errs["nmt"])
    assert errs["lm"].strip().splitlines()[-1] == "KeyError: \"'_name'\""


def test_checkpoint_averaging_script_refuses(real, tmp_path, side_effect):
    """One of the project's scripts end to end (the others use the same load_state/load_models)."""
    path = malicious_files(real, tmp_path / "evil", side_effect)["hidden_in_real_checkpoint"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "average_checkpoints.py"),
                           "--inputs", real["nmt"], path, "--output", str(tmp_path / "avg.pt")],
                          capture_output=True, text=True, env=ENV, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"average_checkpoints.py: error: refused to load {path}: it pickles the global posix.system")
    assert not (tmp_path / "avg.pt").exists()
