"""``--bf16`` through fairseq's console scripts on the CPU, with ``--user-dir gpam_fairseq``
(gpam_fairseq/fairseq_glue/precision.py): daGPAM (transformer_gpam_iwslt_de_en), the stock baseline
(transformer_iwslt_de_en) and the daGPAM language model (transformer_lm_gpam).

* fairseq-train --bf16 trains, is killed while it writes ``checkpoint_last.pt``, resumes and ends
  bit for bit as the uninterrupted bf16 run (weights, lambdas, Adam state); its checkpoints hold
  fp32 weights and the same optimizer as an fp32 run's; its losses follow the fp32 run of the
  same seed within the tolerance below, and differ from it somewhere (bf16 really computed).
* fairseq-generate decodes and scores (sacreBLEU) with --bf16 on the bf16 and on the fp32
  checkpoint, and without it on the bf16 checkpoint (its scores then within the tolerance of the
  --bf16 decoding's, and not identical to them); fairseq-interactive translates with --bf16;
  fairseq-eval-lm scores an fp32 LM with --bf16 (within the tolerance of fp32's, not identical)
  and a bf16 LM without it.
* fairseq-hydra-train trains with ``common.bf16=true``.
* What the other precision flags do on a CPU: ``--fp16`` and ``--amp`` end with one line and exit
  status 2; ``--fp16 --fp16-no-flatten-grads`` and ``--memory-efficient-bf16`` train (the
  latter's weights are bf16 numbers, its lambdas fp32, and fp32 generate loads its checkpoint).

Tolerance. bf16 keeps 8 significant bits: rounding a number to bf16 changes it by a relative
error of at most u = 2^-8, spread about evenly over [-u, u] (mean 0, standard deviation u/sqrt(3)).
Under autocast each matrix product rounds both its operands (fp32 accumulation: its own error is
negligible); softmax, normalisations and the loss stay fp32. Along the deepest path from the
embeddings to the logits the 1+1-layer NMT models chain K = 13 products (encoder: input
projection, Q K^T, weights V, output projection, two feed-forward; decoder cross-attention: key
projection, Q K^T, weights V, output projection; two feed-forward; the output projection), the
1-layer LM K = 7. Independent rounding errors add in quadrature: the logits carry a relative
error of standard deviation sigma = (u / sqrt(3)) sqrt(2 K), and so does the loss, a smooth
function of logits of its own size at these losses (predictions far from confident). The test
allows 3 sigma at every logged update (3.5 % for NMT, 2.6 % for the LM; the worst case, every
error aligned, would be 2 K u = 10 % and 5.5 %) and trains until the fp32 loss has fallen by more
than two such bands, so a bf16 run that does not learn, or learns something else, leaves the band.
"""

import math
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from cli_runs import BIN, ENV, checked, command, describe, hypotheses, last_line, run, run_all, tiny_runs
from gpam_fairseq.checkpointing.checkpoints import load_state
from gpam_fairseq.fairseq_glue.tools import log_records
from helpers import REPO, USER_DIR
from test_kill_resume import PAUSE_IN_COPY
from test_resume import assert_same_state

U = 2.0 ** -8  # bf16's unit roundoff


def tolerance(products):
    return 3 * (U / math.sqrt(3)) * math.sqrt(2 * products)


NMT_TOL, LM_TOL = tolerance(13), tolerance(7)
TINY = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16"]
ARCHS = {
    "dagpam": ["--arch", "transformer_gpam_iwslt_de_en", *TINY, "--gpam-trainable-lambda"],
    "stock": ["--arch", "transformer_iwslt_de_en", *TINY],
}
UPDATES = 24
NMT_TRAIN = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--optimizer", "adam",
             "--lr", "5e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4", "--dropout", "0.1",
             "--attention-dropout", "0.1", "--seed", "3", "--max-tokens", "256", "--required-batch-size-multiple", "1",
             "--log-format", "json", "--log-interval", "1", "--num-workers", "0", "--no-epoch-checkpoints",
             "--save-interval-updates", "8", "--max-update", str(UPDATES)]
LM_TRAIN = ["--task", "language_modeling", "--arch", "transformer_lm_gpam", "--decoder-layers", "1",
            "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "16", "--decoder-attention-heads", "2",
            "--tokens-per-sample", "16", "--sample-break-mode", "none", "--optimizer", "adam", "--lr", "5e-3",
            "--seed", "3", "--max-tokens", "256", "--required-batch-size-multiple", "1", "--log-format", "json",
            "--log-interval", "1", "--num-workers", "0", "--no-epoch-checkpoints", "--max-update", str(UPDATES)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = tiny_runs(str(tmp_path_factory.mktemp("bf16")), checkpoints=False, n_train=300)
    return {"raw": os.path.join(paths["root"], "raw"), "nmt": paths["nmt_bin"], "lm": paths["lm_bin"]}


def train_job(data_bin, save_dir, flags, precision=(), env=ENV):
    return dict(argv=command("fairseq-train", data_bin, "--user-dir", USER_DIR, *flags, *precision,
                             "--save-dir", save_dir), env=env)


def losses(text):
    """{update: loss} of a fairseq JSON log; a killed run's last line may be cut off."""
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]
    return {int(s["num_updates"]): float(s["loss"]) for s in log_records(lines, "train_inner")}


def assert_follows(bf16, fp32, tol, what):
    assert sorted(bf16) == sorted(fp32) == list(range(1, UPDATES + 1)), what
    for update, loss in fp32.items():
        assert abs(bf16[update] - loss) <= tol * loss, f"{what}, update {update}: bf16 {bf16[update]}, fp32 {loss}"
    assert bf16 != fp32, f"{what}: bf16 losses identical to fp32 at every update: was bf16 computed at all?"
    assert fp32[UPDATES] < (1 - 2 * tol) * fp32[1], f"{what}: the loss did not fall beyond the band: {fp32}"
    print(f"\n{what}: max |bf16 - fp32| / fp32 over {UPDATES} updates "
          f"{max(abs(bf16[k] - v) / v for k, v in fp32.items()):.2e} (tolerance {tol:.3g})\n"
          f"  fp32 losses: {[fp32[k] for k in sorted(fp32)]}\n  bf16 losses: {[bf16[k] for k in sorted(fp32)]}")


def float_dtypes(state):
    return {name: t.dtype for name, t in state["model"].items() if t.is_floating_point()}


def positional_scores(text):
    return [line for line in text.splitlines() if line.startswith("P-")]


def start_killed_leg(data_bin, save_dir, flags, tmp_path):
    """fairseq-train --bf16 that stops halfway through its second copy onto checkpoint_last.pt
    (the hook of test_kill_resume.py) and waits there to be killed."""
    hook, marker = tmp_path / "hook", tmp_path / "paused_in_copy"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_IN_COPY)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")]),
               GPAM_TEST_PAUSE_MARKER=str(marker), GPAM_TEST_PAUSE_NTH="2")
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train_job(data_bin, save_dir, flags, ["--bf16"])["argv"], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, marker, log_path


def kill_while_saving(proc, marker, log_path):
    """SIGKILL once the run waits in the middle of its save; returns its log."""
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = log_path.read_text()
    assert alive and marker.exists(), f"not killed while saving:\n{text[-3000:]}"
    return text


@pytest.mark.parametrize("arch", ["dagpam", "stock"])
def test_bf16_trains_resumes_after_a_kill_decodes_and_follows_fp32(data, arch, tmp_path):
    flags = [*ARCHS[arch], *NMT_TRAIN]
    dirs = {name: str(tmp_path / name) for name in ("bf16", "fp32", "split")}
    killing = start_killed_leg(data["nmt"], dirs["split"], flags, tmp_path)  # waits at its second save
    runs = run_all({
        "bf16": train_job(data["nmt"], dirs["bf16"], flags, ["--bf16"]),
        "fp32": train_job(data["nmt"], dirs["fp32"], flags),
    })
    killed = kill_while_saving(*killing)
    resumed = checked(run(train_job(data["nmt"], dirs["split"], flags, ["--bf16"])["argv"]))
    bf16, fp32 = checked(runs["bf16"]), checked(runs["fp32"])

    # resumed after the kill: same losses at every update, the same final state bit for bit
    loaded = re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ (\d+) updates\)", resumed.stdout)
    assert loaded and 0 < int(loaded.group(1)) < max(losses(killed)), describe(resumed)  # the save before the kill
    whole = losses(bf16.stdout)
    legs = {**losses(killed), **losses(resumed.stdout)}
    assert legs and all(loss == whole[update] for update, loss in legs.items()), (legs, whole)
    a, b = load_state(os.path.join(dirs["bf16"], "checkpoint_last.pt")), load_state(os.path.join(dirs["split"], "checkpoint_last.pt"))
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == UPDATES
    assert_same_state(a, b)

    # the checkpoint is an fp32 run's: fp32 weights, the plain optimizer; it says bf16
    f = load_state(os.path.join(dirs["fp32"], "checkpoint_last.pt"))
    assert set(float_dtypes(a).values()) == {torch.float32}
    assert a["optimizer_history"][-1]["optimizer_name"] == f["optimizer_history"][-1]["optimizer_name"] == "FairseqAdam"
    assert a["cfg"]["common"]["bf16"] is True and a["cfg"]["common"]["tpu"] is False
    if arch == "dagpam":
        assert any("lambda_pos_theta" in k for k in a["model"])
    assert_follows(whole, losses(fp32.stdout), NMT_TOL, arch)

    # decode and score: --bf16 on both checkpoints, fp32 on the bf16 one; interactive with --bf16
    def generate(ckpt, *precision):
        return dict(argv=command("fairseq-generate", data["nmt"], "--user-dir", USER_DIR, "--path", ckpt,
                                 "--beam", "2", "--max-tokens", "512", "--scoring", "sacrebleu", *precision))

    bf16_ckpt, fp32_ckpt = (os.path.join(dirs[k], "checkpoint_last.pt") for k in ("bf16", "fp32"))
    with open(os.path.join(data["raw"], "test.src")) as src:
        sources = src.read().splitlines()[:3]
    jobs = {"bf16 on bf16": generate(bf16_ckpt, "--bf16"), "fp32 on bf16": generate(bf16_ckpt),
            "bf16 on fp32": generate(fp32_ckpt, "--bf16")}
    if arch == "dagpam":
        jobs["interactive"] = dict(argv=command("fairseq-interactive", data["nmt"], "--user-dir", USER_DIR, "--path",
                                                bf16_ckpt, "--bf16", "--beam", "2", "--source-lang", "src",
                                                "--target-lang", "tgt"), stdin="\n".join(sources) + "\n")
    out = run_all(jobs)
    for name, proc in out.items():
        checked(proc)
        if name != "interactive":
            assert len(hypotheses(proc.stdout)) == 16, name
            assert re.search(r"Generate test with beam=2: BLEU = [\d.]+ ", proc.stdout), name
    if arch == "dagpam":
        assert len(hypotheses(out["interactive"].stdout)) == 3
    # the same checkpoint decoded with and without --bf16: bf16 computed, scores within the tolerance
    half, full = out["bf16 on bf16"].stdout, out["fp32 on bf16"].stdout
    assert positional_scores(half) != positional_scores(full), "--bf16 decoding is fp32's"
    same = [(hypotheses(half)[i][0], s) for i, (s, tokens) in hypotheses(full).items() if hypotheses(half)[i][1] == tokens]
    assert len(same) >= 8, f"bf16 and fp32 decoding agree on {len(same)} of 16 hypotheses"
    assert all(abs(h - f) <= NMT_TOL * abs(f) for h, f in same), same


def test_bf16_language_model_trains_and_eval_lm_both_ways(data, tmp_path):
    bf16_dir, fp32_dir = str(tmp_path / "bf16"), str(tmp_path / "fp32")
    runs = run_all({"bf16": train_job(data["lm"], bf16_dir, LM_TRAIN, ["--bf16"]),
                    "fp32": train_job(data["lm"], fp32_dir, LM_TRAIN)})
    assert_follows(losses(checked(runs["bf16"]).stdout), losses(checked(runs["fp32"]).stdout), LM_TOL, "LM")

    def eval_lm(save_dir, *precision):
        return dict(argv=command("fairseq-eval-lm", data["lm"], "--user-dir", USER_DIR, "--path",
                                 os.path.join(save_dir, "checkpoint_last.pt"), "--max-tokens", "512",
                                 "--tokens-per-sample", "16", "--output-word-probs", *precision))

    out = run_all({"bf16 on fp32": eval_lm(fp32_dir, "--bf16"), "fp32 on fp32": eval_lm(fp32_dir),
                   "fp32 on bf16": eval_lm(bf16_dir)})
    loss = {}
    for name, proc in out.items():
        text = checked(proc).stdout + proc.stderr
        loss[name] = float(re.search(r"Loss \(base 2\): ([\d.]+)", text).group(1))
        out[name] = re.findall(r"\[(-?[\d.]+)\]", text)  # --output-word-probs: each word's log probability
    assert abs(loss["bf16 on fp32"] - loss["fp32 on fp32"]) <= LM_TOL * loss["fp32 on fp32"], loss
    assert len(out["bf16 on fp32"]) == len(out["fp32 on fp32"]) > 0
    assert out["bf16 on fp32"] != out["fp32 on fp32"], "--bf16 word probabilities are fp32's"
    print(f"eval-lm: {loss}")


def test_hydra_train_with_common_bf16(data, tmp_path):
    from test_hydra import IWSLT, log_stats

    save_dir = tmp_path / "ckpt"
    proc = checked(run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", IWSLT, "--config-name",
                        "transformer_gpam_iwslt_de_en", f"common.user_dir={USER_DIR}", "common.fp16=false",
                        "common.bf16=true", "common.tensorboard_logdir=null", "common.log_interval=1",
                        "checkpoint.no_epoch_checkpoints=true", f"task.data={data['nmt']}", "task.source_lang=src",
                        "task.target_lang=tgt", "optimization.max_update=3", f"checkpoint.save_dir={save_dir}",
                        "dataset.max_tokens=1024", *(f"+model.{k}=16" for k in (
                            "encoder_embed_dim", "decoder_embed_dim", "encoder_ffn_embed_dim", "decoder_ffn_embed_dim")),
                        "+model.encoder_layers=1", "+model.decoder_layers=1"], cwd=str(tmp_path)))
    assert [int(r["num_updates"]) for r in log_stats(proc.stdout + proc.stderr, "train_inner")] == [1, 2, 3]
    state = load_state(str(save_dir / "checkpoint_last.pt"))
    assert state["cfg"]["common"]["bf16"] is True
    assert set(float_dtypes(state).values()) == {torch.float32}


def test_other_precision_flags_on_a_cpu(data, tmp_path):
    flags = [*ARCHS["dagpam"], *NMT_TRAIN[:-2], "--max-update", "3"]
    out = run_all({
        "fp16": train_job(data["nmt"], str(tmp_path / "a"), flags, ["--fp16"]),
        "amp": train_job(data["nmt"], str(tmp_path / "b"), flags, ["--amp"]),
        "fp16 unflattened": train_job(data["nmt"], str(tmp_path / "c"), flags, ["--fp16", "--fp16-no-flatten-grads"]),
        "memory-efficient bf16": train_job(data["nmt"], str(tmp_path / "d"), flags, ["--memory-efficient-bf16"]),
        # fairseq's own language model, the LM recipes' baseline, in bf16 too
        "stock LM bf16": train_job(data["lm"], str(tmp_path / "e"), [
            *LM_TRAIN[:2], "--arch", "transformer_lm", *LM_TRAIN[4:-2], "--max-update", "3", "--disable-validation"],
            ["--bf16"]),
    })
    stats = log_records(checked(out["stock LM bf16"]).stdout.splitlines(), "train_inner")
    assert len(stats) == 3 and all(math.isfinite(float(s["loss"])) for s in stats)
    for flag in ("fp16", "amp"):
        proc = out[flag]
        assert proc.returncode == 2, describe(proc)
        assert last_line(proc.stderr).startswith(f"fairseq-train: error: --{flag} "), describe(proc)
        assert "--bf16" in last_line(proc.stderr) and "Traceback" not in proc.stderr
    stats = log_records(checked(out["fp16 unflattened"]).stdout.splitlines(), "train_inner")
    assert len(stats) == 3 and all(math.isfinite(float(s["loss"])) and float(s["loss_scale"]) >= 1 for s in stats)

    checked(out["memory-efficient bf16"])
    state = load_state(str(tmp_path / "d" / "checkpoint_last.pt"))
    dtypes = float_dtypes(state)
    lambdas = {name for name in dtypes if "lambda_" in name and "theta" in name}
    assert lambdas and {dtypes[n] for n in lambdas} == {torch.float32}  # our fp32 pieces stay fp32
    # fairseq saves half-precision tensors upcast to fp32 (utils.move_to_cpu): the weights are
    # bf16 numbers stored exactly in fp32, the lambdas full fp32 numbers
    model = state["model"]
    weights = [n for n in dtypes if n not in lambdas]
    assert all(torch.equal(model[n], model[n].to(torch.bfloat16).float()) for n in weights)
    assert not all(torch.equal(model[n], model[n].to(torch.bfloat16).float()) for n in lambdas)
    assert state["optimizer_history"][-1]["optimizer_name"] == "MemoryEfficientFP16Optimizer"
    proc = checked(run(command("fairseq-generate", data["nmt"], "--user-dir", USER_DIR, "--path",
                               str(tmp_path / "d" / "checkpoint_last.pt"), "--beam", "2", "--max-tokens", "512")))
    assert len(hypotheses(proc.stdout)) == 16


@pytest.mark.parametrize("xla", [False, True])
def test_bf16_implies_tpu_only_on_a_tpu_host(xla, monkeypatch):
    """What fairseq's parser made of --bf16, before and after the plugin's repair: tpu stays set
    only where torch_xla is importable (fairseq's own test, fairseq.utils.xm)."""
    import fairseq_cli.generate
    import fairseq_cli.train
    from fairseq import options, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from gpam_fairseq.fairseq_glue import precision

    monkeypatch.setattr(utils, "xm", object() if xla else None)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["data", "--user-dir", USER_DIR, "--arch", "transformer_iwslt_de_en",
                                                "--bf16", "--task", "translation"])
    assert args.bf16 and args.tpu  # fairseq-fixed: --bf16 implies --tpu
    for convert in (convert_namespace_to_omegaconf, fairseq_cli.train.convert_namespace_to_omegaconf,
                    fairseq_cli.generate.convert_namespace_to_omegaconf):
        assert getattr(convert, "__wrapped_by_gpam__", False)  # the programs call the repaired one
    cfg = convert_namespace_to_omegaconf(args)
    assert cfg.common.bf16 and cfg.common.tpu == xla and args.tpu == xla
    assert precision.bf16_autocast_wanted(cfg.common) == (not xla)
