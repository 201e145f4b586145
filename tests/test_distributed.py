"""Data parallelism: DistributedDataParallel (gloo, 2 CPU processes) and fairseq-train on 2 ranks.

* Gradients: two ranks under torch's DDP, each on half of a batch, end with the gradients of
  one process on the whole batch (fp32, 1e-6), for the NMT and LM models, with fixed and
  trainable lambdas; DDP runs with ``find_unused_parameters=False``, so a parameter that got
  no gradient would stop the second step, and every parameter is checked to get one.
* fairseq-train itself with ``--distributed-world-size 2 --distributed-backend gloo`` on the
  CPU: trains, checkpoints, and resumes from ``checkpoint_last.pt`` -- which makes rank 0 send
  the checkpoint to rank 1 through fairseq's ``broadcast_object`` and rank 1 unpickle it
  under torch's weights_only allowlist (omegaconf types, _TensorPlaceholder). On CPU fairseq's ``pytorch_ddp`` wrapper
  cannot run (it passes ``device_ids=[0]``), so this uses ``--ddp-backend legacy_ddp``;
  ``scripts/gpu_checks.py`` covers the default backend on a GPU.
"""

import copy
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import REPO, USER_DIR, build_language_model, build_translation_model
from gpam_fairseq.fairseq_glue.tools import log_records
from gpam_fairseq.recipes.synthetic_corpus import write_corpus

WORLD = 2
PER_RANK = 3  # sentences per rank; the single process sees WORLD * PER_RANK
NMT = ["--encoder-layers", "1", "--decoder-layers", "2", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
       "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--dropout", "0", "--attention-dropout", "0"]
LM = ["--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "4",
      "--dropout", "0", "--attention-dropout", "0"]
CONFIGS = {
    "nmt_fixed_lambda": ("nmt", []),
    "nmt_trainable_lambda": ("nmt", ["--gpam-trainable-lambda"]),
    "nmt_trainable_per_head": ("nmt", ["--gpam-trainable-lambda", "--gpam-lambda-scope", "head", "--gpam-neg-query", "per_head"]),
    "lm_fixed_lambda": ("lm", []),
    "lm_trainable_lambda": ("lm", ["--gpam-trainable-lambda", "--gpam-lambda-scope", "head"]),
}
VOCAB = 40
PAD = 1


def build(kind, extra):
    torch.manual_seed(0)
    if kind == "nmt":
        return build_translation_model("transformer_gpam_iwslt_de_en", NMT + extra, VOCAB, VOCAB)
    return build_language_model("transformer_lm_gpam", LM + extra, vocab=VOCAB)


def make_batch(kind, n, seed):
    """n sentences of different lengths, padded the way fairseq pads them."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(3, 9, (n,), generator=g)]
    lengths[0] = 9  # the longest sets the width; the others get padding
    width = max(lengths)
    src = torch.full((n, width), PAD)
    tgt = torch.full((n, width), PAD)
    prev = torch.full((n, width), PAD)
    for i, length in enumerate(lengths):
        words = torch.randint(4, VOCAB, (length,), generator=g)
        src[i, width - length:] = words  # sources left-padded (fairseq's default)
        tgt[i, :length] = torch.roll(words, 1)
        prev[i, :length] = torch.cat([torch.tensor([2]), tgt[i, : length - 1]])  # eos first, as fairseq shifts
    if kind == "nmt":
        return {"src_tokens": src, "src_lengths": torch.tensor(lengths), "prev_output_tokens": prev}, tgt
    return {"src_tokens": prev}, tgt


def summed_loss(model, net_input, target, scale):
    """Summed token NLL times a constant: its gradients add up across shards exactly."""
    logits = model(**net_input)[0]
    nll = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), target.view(-1),
                                            ignore_index=PAD, reduction="sum")
    return nll * scale


def _worker(rank, init_file, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    report = {}
    for name, (kind, extra) in CONFIGS.items():
        model = build(kind, extra)
        reference = copy.deepcopy(model)
        net_input, target = make_batch(kind, WORLD * PER_RANK, seed=7)
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        shard_input = {k: v[shard] for k, v in net_input.items()}
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        scale = 1.0 / 50
        # DDP averages the ranks' gradients; x WORLD turns the average back into the sum
        summed_loss(ddp, shard_input, target[shard], scale * WORLD).backward()
        # a second step: with find_unused_parameters=False, DDP raises here if a parameter got no gradient
        summed_loss(ddp, shard_input, target[shard], scale * WORLD).backward()
        summed_loss(reference, net_input, target, scale).backward()
        diffs, missing = {}, []
        for (pname, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            if p.grad is None or q.grad is None:
                missing.append(pname)
                continue
            diffs[pname] = (p.grad / 2 - q.grad).abs().max().item()  # two identical steps accumulated
        report[name] = {
            "max_diff": max(diffs.values()),
            "worst": max(diffs, key=diffs.get),
            "missing": missing,
            "n_params": len(diffs) + len(missing),
            "lambda_params": [n for n in diffs if "lambda" in n and "theta" in n],
            "grad_norm": sum(float(q.grad.norm()) ** 2 for q in reference.parameters()) ** 0.5,
        }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out = root / "report.json"
    mp.spawn(_worker, args=(str(root / "init"), str(out)), nprocs=WORLD, join=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_gradients_equal_one_process_on_the_whole_batch(ddp_report, name):
    r = ddp_report[name]
    print(f"\n{name}: max |grad_ddp - grad_single| = {r['max_diff']:.2e} (worst {r['worst']}), grad norm {r['grad_norm']:.3f}")
    assert not r["missing"], f"parameters without gradient: {r['missing']}"
    assert r["grad_norm"] > 1e-3  # gradients are not trivially zero
    assert r["max_diff"] <= 1e-6, r
    if "trainable" in name:
        assert r["lambda_params"], "trainable lambdas should be parameters that DDP reduces"
    else:
        assert not r["lambda_params"]


# ---------------------------------------------------------------- fairseq-train on 2 ranks

BIN = os.path.dirname(sys.executable)
ENV = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
ENV["PATH"] = BIN + os.pathsep + ENV.get("PATH", "")
ENV["OMP_NUM_THREADS"] = "1"
CLI_NMT = ["--arch", "transformer_gpam_iwslt_de_en", "--encoder-layers", "1", "--decoder-layers", "1",
           "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
           "--decoder-ffn-embed-dim", "16", "--gpam-trainable-lambda", "--optimizer", "adam", "--lr", "1e-3",
           "--max-tokens", "512", "--no-epoch-checkpoints", "--seed", "1", "--log-format", "json", "--log-interval", "1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_ranks(data_bin, save_dir, max_update):
    """Two fairseq-train processes, one per rank, as torchrun/SLURM would start them."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [os.path.join(BIN, "fairseq-train"), data_bin, "--user-dir", USER_DIR, *CLI_NMT,
             "--max-update", str(max_update), "--save-dir", save_dir, "--cpu",
             "--distributed-world-size", str(WORLD), "--distributed-rank", str(rank), "--distributed-no-spawn",
             "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-backend", "gloo",
             "--ddp-backend", "legacy_ddp"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
        for rank in range(WORLD)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("fairseq-train on 2 gloo ranks did not finish in 300 s")
    for rank, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            pytest.fail(f"rank {rank} failed ({p.returncode}):\n{out[-4000:]}")
    return outs


def test_fairseq_train_two_gloo_ranks_checkpoint_and_resume(tmp_path):
    raw = str(tmp_path / "raw")
    write_corpus(raw, n_train=400, n_valid=16, n_test=16, vocab=20, max_len=6)
    data_bin = str(tmp_path / "bin")
    subprocess.run([os.path.join(BIN, "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
                    "--trainpref", f"{raw}/train", "--validpref", f"{raw}/valid", "--destdir", data_bin,
                    "--workers", "1"], check=True, capture_output=True, env=ENV, cwd=REPO)
    save_dir = str(tmp_path / "ckpt")
    first = train_two_ranks(data_bin, save_dir, 3)
    assert "distributed init (rank 1)" in first[1] or "initialized host" in first[1], first[1][-2000:]
    assert os.path.exists(os.path.join(save_dir, "checkpoint_last.pt"))
    resumed = train_two_ranks(data_bin, save_dir, 6)
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 3 updates\)", resumed[0])
    # rank 1 received the checkpoint through broadcast_object and went on training with rank 0
    updates = [int(s["num_updates"]) for s in log_records(resumed[0].splitlines(), "train_inner")]
    assert updates and updates[0] == 4 and updates[-1] == 6, updates
    assert "UnpicklingError" not in resumed[1]
