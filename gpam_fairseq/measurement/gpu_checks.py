"""The GPU checks of training on a GPU (distributed, fp16, autocast), in one command, with a PASS/FAIL table.

    python scripts/gpu_checks.py [--out runs/gpu_checks] [--only NAME ...] [--list]

Without CUDA it prints ``skipped: no CUDA`` and exits 0 (the CPU counterparts are tests in
``make test``). On a GPU it runs, through the real command lines with ``--user-dir gpam_fairseq``:

* ``nmt_2ranks_gloo``: ``torchrun --nproc_per_node 2 fairseq-train ... --distributed-world-size 2
  --distributed-backend gloo`` on one GPU (two ranks on one card, fairseq's default
  ``pytorch_ddp``), a translation model with trainable lambdas: trains, checkpoints, then
  resumes from ``checkpoint_last.pt`` (rank 0 broadcasts it, rank 1 unpickles it under
  torch's weights_only allowlist, which must hold omegaconf's types and _TensorPlaceholder).
* ``lm_adaptive_2ranks_legacy_ddp``: the same for the adaptive-input/adaptive-softmax LM
  (``transformer_lm_gpam_wiki103`` shrunk, ``--criterion adaptive_loss --ddp-backend legacy_ddp``).
* ``fp16_loss_scale``: ``fairseq-train --fp16``, 300 updates: losses finite, the loss
  scale never below 1 (fairseq starts at 128 and halves on every overflow).
* ``autocast_bf16`` / ``autocast_fp16``: a translation model's training step on the GPU under
  ``torch.autocast`` (forward, backward finite, close to fp32), with a fully padded sentence,
  plus a 2048-token causal daGPAM attention forward/backward.
* ``fairseq_bf16_flag``: ``fairseq-train --bf16`` with the plugin (which repairs fairseq-fixed's
  ``tpu=True``: bf16 autocast, fp32 weights), 100 updates on the GPU: exit 0, losses finite and
  falling, no loss scale (bf16 needs none).

Writes ``gpu_checks.md`` and ``gpu_checks.csv`` (and each step's log) into ``--out``; exits 1
if any check fails.
"""

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT as REPO, USER_DIR, log_records, say
from gpam_fairseq.recipes.synthetic_corpus import write_corpus
from gpam_fairseq.fairseq_glue.cli_errors import refusals_exit_2

# fairseq's tools as modules of this interpreter: works wherever fairseq is importable (a venv, a
# --target install on PYTHONPATH), not only where its console scripts sit next to sys.executable
PREPROCESS = [sys.executable, "-m", "fairseq_cli.preprocess"]
TRAIN = [sys.executable, "-m", "fairseq_cli.train"]

NMT = ["--arch", "transformer_gpam_iwslt_de_en", "--encoder-layers", "2", "--decoder-layers", "2",
       "--encoder-embed-dim", "64", "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
       "--decoder-ffn-embed-dim", "128", "--share-decoder-input-output-embed", "--gpam-trainable-lambda",
       "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
       "--warmup-updates", "50", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
       "--dropout", "0.1", "--max-tokens", "2048", "--seed", "1"]
LM = ["--task", "language_modeling", "--arch", "transformer_lm_gpam_wiki103", "--decoder-layers", "2",
      "--decoder-embed-dim", "64", "--decoder-input-dim", "64", "--decoder-output-dim", "64",
      "--decoder-ffn-embed-dim", "128", "--decoder-attention-heads", "4", "--adaptive-input-cutoff", "20,40",
      "--adaptive-softmax-cutoff", "20,40", "--gpam-trainable-lambda", "--criterion", "adaptive_loss",
      "--tokens-per-sample", "64", "--sample-break-mode", "none", "--optimizer", "nag", "--lr", "0.05",
      "--clip-norm", "0.1", "--max-tokens", "2048", "--seed", "1"]
COMMON = ["--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "10",
          "--required-batch-size-multiple", "1"]
CHECKS = ["nmt_2ranks_gloo", "lm_adaptive_2ranks_legacy_ddp", "fp16_loss_scale", "autocast_bf16",
          "autocast_fp16", "fairseq_bf16_flag"]


def run_logged(cmd, log_path, timeout):
    """Run a command, its output into log_path; returns (exit code, output)."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                              env={k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"})
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, f"timed out after {timeout} s\n" + (err.stdout or b"").decode(errors="replace")
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n\n" + out)
    say(f"    exit {code} in {time.time() - start:.0f} s, log {log_path}")
    return code, out


def last_error(out):
    lines = [line for line in out.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"Error|error:|Exception", line)]
    return (errors or lines or ["no output"])[-1][:200]


def prepare_data(root):
    raw = os.path.join(root, "raw")
    write_corpus(raw, n_train=5000, n_valid=200, n_test=200)
    nmt, lm = os.path.join(root, "nmt-bin"), os.path.join(root, "lm-bin")
    for cmd in (
        [*PREPROCESS, "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", f"{raw}/train", "--validpref", f"{raw}/valid", "--destdir", nmt, "--workers", "4"],
        [*PREPROCESS, "--only-source", "--trainpref", f"{raw}/train.tgt",
         "--validpref", f"{raw}/valid.tgt", "--destdir", lm, "--workers", "4"],
    ):
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return nmt, lm


def two_ranks_train_and_resume(name, data_bin, model_args, extra, out_dir, timeout):
    """torchrun with 2 processes on the one GPU: 30 updates, then resume to 60 from checkpoint_last."""
    save_dir = os.path.join(out_dir, name)
    port = str(29500 + os.getpid() % 1000)
    details = []
    for leg, max_update in (("train", 30), ("resume", 60)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "--module", "fairseq_cli.train", data_bin, "--user-dir", USER_DIR, *model_args, *COMMON,
               "--distributed-world-size", "2", "--distributed-backend", "gloo", *extra,
               "--max-update", str(max_update), "--save-dir", save_dir]
        say(f"  [{name}] {leg}: fairseq-train on 2 gloo ranks, one GPU, up to {max_update} updates")
        code, out = run_logged(cmd, os.path.join(out_dir, f"{name}_{leg}.log"), timeout)
        if code != 0:
            return False, f"{leg}: exit {code}: {last_error(out)}"
        stats = log_records(out.splitlines(), "train_inner")
        losses = [float(s["loss"]) for s in stats]
        if not losses or not all(map(_finite, losses)):
            return False, f"{leg}: losses {losses}"
        if leg == "train" and not os.path.exists(os.path.join(save_dir, "checkpoint_last.pt")):
            return False, "no checkpoint_last.pt"
        if leg == "resume":
            if not re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 30 updates\)", out):
                return False, "resume did not load checkpoint_last.pt @ 30 updates"
            if "UnpicklingError" in out or "Weights only load failed" in out:
                return False, "a rank could not unpickle the broadcast checkpoint"
            if int(stats[-1]["num_updates"]) != 60:
                return False, f"resumed run ended at {stats[-1]['num_updates']} updates"
        details.append(f"{leg} loss {losses[0]:.3f}->{losses[-1]:.3f}")
    return True, "; ".join(details) + "; rank 1 loaded the broadcast checkpoint"


def _finite(x):
    return x == x and abs(x) != float("inf")


def train_records(name, nmt_bin, precision_flag, updates, out_dir, timeout):
    """fairseq-train of the small NMT model in one precision: (its train_inner records, None), or
    (None, why it failed)."""
    cmd = [*TRAIN, nmt_bin, "--user-dir", USER_DIR, *NMT, *COMMON, precision_flag,
           "--max-update", str(updates), "--no-save"]
    say(f"  [{name}] fairseq-train {precision_flag}, {updates} updates")
    code, out = run_logged(cmd, os.path.join(out_dir, f"{name}.log"), timeout)
    if code != 0:
        return None, f"exit {code}: {last_error(out)}"
    stats = log_records(out.splitlines(), "train_inner")
    return (stats, None) if stats else (None, "no train_inner records in the log")


def fp16_loss_scale(nmt_bin, out_dir, timeout):
    stats, failure = train_records("fp16_loss_scale", nmt_bin, "--fp16", 300, out_dir, timeout)
    if failure:
        return False, failure
    losses = [float(s["loss"]) for s in stats]
    scales = [float(s["loss_scale"]) for s in stats if "loss_scale" in s]
    if not scales:
        return False, "no loss_scale in the log"
    ok = all(map(_finite, losses)) and min(scales) >= 1.0 and losses[-1] < losses[0]
    return ok, (f"loss {losses[0]:.3f}->{losses[-1]:.3f}; loss scale min {min(scales):g}, "
                f"last {scales[-1]:g} (start 128)")


def autocast_check(dtype_name):
    """A training step of a small NMT model under autocast on the GPU, and a long causal attention."""
    import copy

    import torch

    from gpam_fairseq.fairseq_glue.tools import build_translation_model
    from gpam_fairseq.modules.transformer import build_attention
    from gpam_fairseq.options import GPAMOptions

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return False, "this GPU has no bf16"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_translation_model(
        "transformer_gpam_iwslt_de_en",
        ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
         "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128", "--dropout", "0",
         "--gpam-trainable-lambda"], 100, 100).to(dev)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 100, (8, 20), generator=g)
    src[0, :-1] = 1  # a sentence that is all padding but its last token
    src[1, :10] = 1
    prev = torch.randint(4, 100, (8, 16), generator=g)
    target = torch.randint(4, 100, (8 * 16,), generator=g).to(dev)
    batch = dict(src_tokens=src.to(dev), src_lengths=torch.tensor([1, 10] + [20] * 6).to(dev),
                 prev_output_tokens=prev.to(dev))

    def step(m, autocast):
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            logits = m(**batch)[0]
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), target)
        loss.backward()
        return loss.detach(), [p.grad for p in m.parameters()]

    loss, grads = step(model, True)
    ref_loss, ref_grads = step(reference, False)
    if not torch.isfinite(loss) or not all(gr is not None and torch.isfinite(gr).all() for gr in grads):
        return False, "model step not finite"
    rel = abs(float(loss - ref_loss)) / abs(float(ref_loss))

    attn = build_attention("dec_self", GPAMOptions(), 256, 8, self_attention=True).to(dev)
    x = torch.randn(2048, 2, 256, device=dev, requires_grad=True)
    mask = torch.triu(torch.full((2048, 2048), float("-inf"), device=dev), 1)
    with torch.autocast("cuda", dtype=dtype):
        out, _ = attn(x, x, x, attn_mask=mask, need_weights=False)
    out.float().square().mean().backward()
    if not torch.isfinite(out).all() or not torch.isfinite(x.grad).all():
        return False, "2048-token causal attention not finite"
    return rel < 2e-2, f"loss {float(loss):.4f} vs fp32 {float(ref_loss):.4f} (rel {rel:.1e}); 2048-token causal ok"


def fairseq_bf16_flag(nmt_bin, out_dir, timeout):
    stats, failure = train_records("fairseq_bf16_flag", nmt_bin, "--bf16", 100, out_dir, timeout)
    if failure:
        return False, failure
    losses = [float(s["loss"]) for s in stats]
    scaled = [s["loss_scale"] for s in stats if "loss_scale" in s]
    ok = all(map(_finite, losses)) and losses[-1] < losses[0] and not scaled
    return ok, f"loss {losses[0]:.3f}->{losses[-1]:.3f}; {'loss scale logged' if scaled else 'no loss scale'}"


def write_tables(rows, out_dir):
    md = ["| check | result | details |", "| --- | --- | --- |"]
    md += [f"| {r['check']} | {r['result']} | {r['details']} |" for r in rows]
    with open(os.path.join(out_dir, "gpu_checks.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out_dir, "gpu_checks.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["check", "result", "details"])
        writer.writeheader()
        writer.writerows(rows)
    return "\n".join(md)


@refusals_exit_2
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "gpu_checks"), help="output folder (replaced)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="run only these checks")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per fairseq command")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0

    import torch

    if not torch.cuda.is_available():
        print(f"skipped: no CUDA (torch {torch.__version__}, cuda build: {torch.version.cuda}); "
              "the CPU counterparts of these checks run in `make test`")
        return 0

    out_dir = os.path.abspath(args.out)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    say(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    selected = args.only or CHECKS
    start = time.time()
    say("preparing the synthetic corpus (5,000 pairs) ...")
    nmt_bin, lm_bin = prepare_data(out_dir)

    rows = []
    for name in selected:
        t0 = time.time()
        try:
            if name == "nmt_2ranks_gloo":
                ok, details = two_ranks_train_and_resume(name, nmt_bin, NMT, [], out_dir, args.timeout)
            elif name == "lm_adaptive_2ranks_legacy_ddp":
                ok, details = two_ranks_train_and_resume(name, lm_bin, LM, ["--ddp-backend", "legacy_ddp"],
                                                         out_dir, args.timeout)
            elif name == "fp16_loss_scale":
                ok, details = fp16_loss_scale(nmt_bin, out_dir, args.timeout)
            elif name in ("autocast_bf16", "autocast_fp16"):
                say(f"  [{name}] training step under torch.autocast on the GPU")
                ok, details = autocast_check(name.split("_")[1])
            else:
                ok, details = fairseq_bf16_flag(nmt_bin, out_dir, args.timeout)
        except Exception as err:  # a check that crashes is a failed check; the others still run
            ok, details = False, f"{type(err).__name__}: {err}".splitlines()[0][:200]
        result = ok if isinstance(ok, str) else ("PASS" if ok else "FAIL")
        rows.append({"check": name, "result": result, "details": f"{details} ({time.time() - t0:.0f} s)"})
        say(f"  {name}: {result}  {details}")

    say("")
    say(write_tables(rows, out_dir))
    say(f"\ntables and logs in {out_dir} ({time.time() - start:.0f} s)")
    return 1 if any(r["result"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
