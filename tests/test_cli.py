"""End to end through the real fairseq command lines, on tiny data the tests generate.

No test here sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: loading checkpoints must work with
torch's weights_only default, thanks to the plugin's allowlist alone.
"""

import glob
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO, USER_DIR
from gpam_fairseq.fairseq_glue.tools import fairseq_cli, log_records
from gpam_fairseq.recipes.synthetic_corpus import write_corpus

BIN = os.path.dirname(sys.executable)
ENV = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
ENV["PATH"] = BIN + os.pathsep + ENV.get("PATH", "")

NMT_ARCH = [
    "--arch", "transformer_gpam_iwslt_de_en",
    "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--share-decoder-input-output-embed",
]
TRAIN = [
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "2048",
    "--seed", "1", "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "10",
]
LM_ARCH = ["--arch", "transformer_lm_gpam", "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
           "--decoder-attention-heads", "4", "--share-decoder-input-output-embed"]
LM_TRAIN = ["--task", "language_modeling", "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "fixed",
            "--tokens-per-sample", "32", "--sample-break-mode", "none", "--max-tokens", "1024", "--seed", "1",
            "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "10"]
GENERATE = ["--beam", "5", "--batch-size", "32", "--required-batch-size-multiple", "1"]


def run_cli(name, *args, stdin=None, env=ENV):
    """Run a fairseq console script (this venv's, else the one on PATH, as on a GPU machine with
    fairseq installed by --target)."""
    return subprocess.run([fairseq_cli(name), *args], input=stdin, capture_output=True, text=True, env=env, cwd=REPO)


def cli(name, *args, stdin=None):
    """Run a fairseq console script; fail the test with its output if it fails."""
    proc = run_cli(name, *args, stdin=stdin)
    if proc.returncode != 0:
        pytest.fail(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def cli_fails(name, *args, env=ENV):
    """Run a fairseq console script that must fail; returns its stderr."""
    proc = run_cli(name, *args, env=env)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stderr


def log_stats(output, tag):
    return log_records(output.splitlines(), tag)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    raw = os.path.join(root, "raw")
    write_corpus(raw, n_train=2000, n_valid=64, n_test=50, vocab=30, max_len=8)
    data_bin = os.path.join(root, "data-bin")
    cli("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", f"{raw}/train",
        "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test", "--destdir", data_bin, "--workers", "1")
    return {"root": str(root), "raw": raw, "bin": data_bin}


@pytest.fixture(scope="module")
def nmt_run(corpus):
    save_dir = os.path.join(corpus["root"], "ckpt_gpam")
    tb = os.path.join(corpus["root"], "tb")
    out = cli("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "60",
              "--save-dir", save_dir, "--tensorboard-logdir", tb)
    return {"save_dir": save_dir, "tb": tb, "log": out}


def test_train_writes_checkpoints_and_tensorboard_events(nmt_run):
    assert os.path.exists(os.path.join(nmt_run["save_dir"], "checkpoint_best.pt"))
    assert os.path.exists(os.path.join(nmt_run["save_dir"], "checkpoint_last.pt"))
    losses = [float(s["loss"]) for s in log_stats(nmt_run["log"], "train_inner")]
    assert len(losses) >= 5 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for split in ("train", "train_inner", "valid"):
        events = glob.glob(os.path.join(nmt_run["tb"], split, "events.out.tfevents.*"))
        assert events, split
        acc = EventAccumulator(os.path.join(nmt_run["tb"], split))
        acc.Reload()
        assert "loss" in acc.Tags()["scalars"], split


def test_checkpoint_holds_gpam_parameters(nmt_run):
    state = torch.load(os.path.join(nmt_run["save_dir"], "checkpoint_best.pt"), map_location="cpu")  # weights_only
    keys = state["model"].keys()
    assert "encoder.layers.0.self_attn.mechanism.w_q_neg" in keys
    assert "decoder.layers.1.encoder_attn.mechanism.w_q_neg" in keys
    assert state["cfg"]["model"].attention_type == "dagpam"  # an argparse.Namespace


def generate_outputs(out):
    """fairseq-generate's detokenised hypotheses and references, in corpus order."""
    hyps = {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t\S+\t(.*)$", out, re.M)}
    refs = {int(m.group(1)): m.group(2) for m in re.finditer(r"^T-(\d+)\t(.*)$", out, re.M)}
    assert sorted(hyps) == sorted(refs)
    ids = sorted(refs)
    return [hyps[i] for i in ids], [refs[i] for i in ids]


def test_generate_beam5_and_sacrebleu(corpus, nmt_run):
    from sacrebleu.metrics import BLEU

    ckpt = os.path.join(nmt_run["save_dir"], "checkpoint_best.pt")
    out = cli("fairseq-generate", corpus["bin"], "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "test", *GENERATE)
    hyps, refs = generate_outputs(out)
    assert len(hyps) == len(refs) == 50
    with open(os.path.join(corpus["raw"], "test.tgt")) as f:
        assert refs == f.read().splitlines()  # every reference, in corpus order
    bleu = BLEU()
    score = bleu.corpus_score(hyps, [refs]).score
    assert str(bleu.get_signature()).startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    # fairseq-generate's own scorer pairs each hypothesis with its reference inside the process;
    # the same corpus BLEU (unsmoothed, on the space-separated tokens) from the parsed output
    # agrees only if the parsing kept every hypothesis with its reference
    fairseq_bleu = float(re.search(r"BLEU4 = ([\d.]+)", out).group(1))
    plain = BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(hyps, [refs]).score
    assert plain == pytest.approx(fairseq_bleu, abs=0.01)
    # the scoring itself: a system that outputs the references (fairseq-generate --score-reference,
    # through the same parsing) scores 100, the same outputs shuffled across sentences far lower
    out_ref = cli("fairseq-generate", corpus["bin"], "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "test",
                  "--score-reference", *GENERATE)
    copied, refs_again = generate_outputs(out_ref)
    assert refs_again == refs and BLEU().corpus_score(copied, [refs]).score == pytest.approx(100.0)
    shuffled = copied[1:] + copied[:1]
    assert BLEU().corpus_score(shuffled, [refs]).score < 20  # measured: 6-8 on this corpus
    assert score < 100


def soft_alignment_rows(out):
    """The weight rows of fairseq-generate's --print-alignment soft lines (one row per target token)."""
    lines = re.findall(r"^A-\d+\t(.*)$", out, re.M)
    assert len(lines) == 50
    return [[float(x) for x in row.split(",")] for line in lines for row in line.split()]


@pytest.mark.parametrize("lambdas", [(0.2, 0.2), (0.0, 0.0), (1.0, 1.0)], ids=["trained", "lambda0", "lambda1"])
def test_generate_print_alignment_uses_signed_weights(corpus, nmt_run, lambdas):
    """--print-alignment soft prints the alignment layer's cross-attention weights (mean over
    heads) of every target token of the beam-search hypotheses: daGPAM's P_G. The trained λ, then
    the same checkpoint with λ+ = λ- = 0 (plain softmax: no weight below 0) and λ+ = λ- = 1
    (--model-overrides): each row sums to 1 + λ+ - λ- = 1 and lies in [-λ-, 1 + λ+], and with
    λ- = 1 some printed weights are negative."""
    lambda_pos, lambda_neg = lambdas
    overrides = [] if lambdas == (0.2, 0.2) else [
        "--model-overrides", str({"gpam_lambda_pos": lambda_pos, "gpam_lambda_neg": lambda_neg})]
    out = cli("fairseq-generate", corpus["bin"], "--user-dir", USER_DIR, "--path",
              os.path.join(nmt_run["save_dir"], "checkpoint_best.pt"), "--gen-subset", "test",
              "--print-alignment", "soft", *overrides, *GENERATE)
    rows = soft_alignment_rows(out)
    weights = [w for row in rows for w in row]
    for row in rows:
        assert sum(row) == pytest.approx(1.0, abs=1e-6 * len(row) + 1e-6)
    assert -lambda_neg - 1e-6 <= min(weights) and max(weights) <= 1 + lambda_pos + 1e-6
    if lambda_neg == 0:
        assert min(weights) >= 0
    if lambda_neg == 1.0:  # measured: about 80 of 2,600 weights, down to -0.09
        assert min(weights) < -1e-3 and sum(w < 0 for w in weights) >= 10


def test_interactive(corpus, nmt_run):
    with open(os.path.join(corpus["raw"], "test.src")) as f:
        lines = [next(f) for _ in range(3)]
    out = cli("fairseq-interactive", corpus["bin"], "--user-dir", USER_DIR, "--path",
              os.path.join(nmt_run["save_dir"], "checkpoint_best.pt"), "--beam", "5", "--source-lang", "src",
              "--target-lang", "tgt", stdin="".join(lines))
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 3


def test_resume_from_checkpoint_last(corpus, nmt_run, tmp_path):
    save_dir = tmp_path / "resume"
    save_dir.mkdir()
    with open(os.path.join(nmt_run["save_dir"], "checkpoint_last.pt"), "rb") as src:
        (save_dir / "checkpoint_last.pt").write_bytes(src.read())
    out = cli("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "80",
              "--save-dir", str(save_dir))
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 60 updates\)", out)
    updates = [int(s["num_updates"]) for s in log_stats(out, "train_inner")]
    assert updates and updates[0] > 60 and updates[-1] == 80


def test_hub_from_pretrained_translate(corpus, nmt_run):
    from gpam_fairseq.models.transformer_gpam import TransformerGPAMModel

    hub = TransformerGPAMModel.from_pretrained(nmt_run["save_dir"], checkpoint_file="checkpoint_best.pt",
                                               data_name_or_path=corpus["bin"], source_lang="src", target_lang="tgt")
    with open(os.path.join(corpus["raw"], "test.src")) as f:
        sentence = f.readline().strip()
    translation = hub.translate(sentence, beam=5)
    assert isinstance(translation, str) and translation.strip()
    assert hub.models[0].encoder.layers[0].self_attn.attention_type == "dagpam"


def test_stock_checkpoint_loads_with_the_plugin(corpus, tmp_path):
    """A stock fairseq checkpoint (argparse.Namespace inside) generates without the env var."""
    save_dir = str(tmp_path / "stock")
    stock_arch = ["--arch", "transformer_iwslt_de_en"] + NMT_ARCH[2:]
    cli("fairseq-train", corpus["bin"], *stock_arch, *TRAIN, "--max-update", "5", "--save-dir", save_dir)
    out = cli("fairseq-generate", corpus["bin"], "--user-dir", USER_DIR, "--path", os.path.join(save_dir, "checkpoint_last.pt"),
              "--gen-subset", "test", *GENERATE)
    assert len(re.findall(r"^H-\d+", out, re.M)) == 50


@pytest.fixture(scope="module")
def lm_run(corpus):
    lm_bin = os.path.join(corpus["root"], "lm-bin")
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{corpus['raw']}/train.tgt",
        "--validpref", f"{corpus['raw']}/valid.tgt", "--testpref", f"{corpus['raw']}/test.tgt", "--destdir", lm_bin, "--workers", "1")
    save_dir = os.path.join(corpus["root"], "ckpt_lm")
    out = cli("fairseq-train", lm_bin, "--user-dir", USER_DIR, *LM_ARCH, *LM_TRAIN, "--max-update", "30",
              "--gpam-lambda-pos", "0.35", "--save-dir", save_dir)
    return {"bin": lm_bin, "save_dir": save_dir, "log": out}


def test_language_model_train_and_eval_lm(lm_run):
    out = cli("fairseq-eval-lm", lm_run["bin"], "--user-dir", USER_DIR, "--path", os.path.join(lm_run["save_dir"], "checkpoint_best.pt"),
              "--gen-subset", "test", "--tokens-per-sample", "32", "--context-window", "16", "--batch-size", "8")
    m = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", out)
    assert m, out[-2000:]
    ppl = float(m.group(2))
    assert math.isfinite(ppl) and 1 < ppl < 200  # 30 updates on a ~34-word vocabulary


def test_language_model_options_reach_the_layers_through_the_cli(lm_run):
    from gpam_fairseq.models.transformer_lm_gpam import TransformerLanguageModelGPAM

    hub = TransformerLanguageModelGPAM.from_pretrained(lm_run["save_dir"], checkpoint_file="checkpoint_best.pt",
                                                       data_name_or_path=lm_run["bin"])
    mechs = [layer.self_attn.mechanism for layer in hub.models[0].decoder.layers]
    assert [m.name for m in mechs] == ["dagpam", "dagpam"]
    assert all(m.lambdas() == (0.35, 0.2) for m in mechs)


def test_language_model_softmax_baseline_through_the_cli(lm_run, tmp_path):
    save_dir = str(tmp_path / "lm_softmax")
    cli("fairseq-train", lm_run["bin"], "--user-dir", USER_DIR, *LM_ARCH, *LM_TRAIN, "--max-update", "2",
        "--attention-type", "softmax", "--save-dir", save_dir)
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu")
    assert not [k for k in state["model"] if "mechanism" in k]


def test_language_model_refuses_xformers_config_through_the_cli(lm_run, tmp_path):
    """fairseq's own LM would build xFormers attention for this flag and die on the missing
    package ("Please install xFormers"); ours runs on SDPA and says so in one line, naming the flag."""
    proc = run_cli("fairseq-train", lm_run["bin"], "--user-dir", USER_DIR, *LM_ARCH, *LM_TRAIN, "--max-update", "1",
                   "--decoder-xformers-att-config", "{'name': 'scaled_dot_product'}", "--save-dir", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("fairseq-train: error: --decoder-xformers-att-config: not supported by transformer_lm_gpam (its "
                    "attention runs through torch scaled_dot_product_attention); drop the flag"), proc.stderr[-2000:]
    assert "xFormers" not in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "x" / "checkpoint_last.pt")

