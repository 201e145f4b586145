#!/usr/bin/env python
"""The paper's controlled experiment at reproducible scale: one 15-layer language model per
attention type, identical budget and seed, then perplexity and the collapse analysis.

For each type in --attention-types it runs fairseq-train (same flags, same --seed, only
--attention-type differs), fairseq-eval-lm on the test split, and finally the collapse
analysis of scripts/analyze_collapse.py (gpam_fairseq/measurement/collapse/) on all
checkpoints (the first --analysis-batch sentences of the valid split). It writes, under
--out-dir:

    results.md, results.csv     perplexity per attention type (+ parameters, time, collapse figures)
    collapse.csv, collapse.png  residual ratio, cosine similarity, ||dL/dW_Q|| per layer and type
    trained_lambda.csv          with --extra-train-args "--gpam-trainable-lambda ...": daGPAM's learned lambdas
    ckpt/<type>/, logs/<type>.{train,eval}.log

Data: --data-bin from the PTB recipe (examples/ptb/, fairseq-preprocess --only-source), or
--synthetic, which writes a small synthetic word-level corpus (a random first-order Markov
chain over pseudo-words: each word depends on the previous one only; NOT Penn Treebank) for
CPU runs, and reports the perplexity of the chain itself on the test words. --small shrinks the
model and budget to a CPU-sized run (minutes); --quick to a smoke test of the whole pipeline
(2 layers, a few updates, a smaller corpus; seconds per type); the defaults are the full-size run.

    python examples/ptb/controlled/run_controlled.py --data-bin data/ptb/data-bin --out-dir results/ptb_controlled
    python examples/ptb/controlled/run_controlled.py --synthetic --small --out-dir results/ptb_controlled_small
    python examples/ptb/controlled/run_controlled.py --synthetic --quick --out-dir /tmp/ptb_controlled_quick
"""

import argparse
import csv
import logging
import math
import os
import random
import sys
import time

from gpam_fairseq.fairseq_glue.tools import (
    USER_DIR, fairseq_cli, log_records, parse_training_log, read_eval_lm_output, run_logged)
from gpam_fairseq.options import ATTENTION_TYPES

ALL_TYPES = ",".join(ATTENTION_TYPES)  # every registered --attention-type

# The model is the PTB recipe's transformer_lm_gpam_ptb (15 layers, Pre-LN; examples/ptb/) in
# both sizes, with the recipe's optimiser; --small only shrinks width, context and budget.
# No early stopping: every type gets exactly max_update updates.
SIZES = {
    "full": dict(layers=15, embed_dim=384, ffn_dim=1536, heads=6, tokens_per_sample=256, max_tokens=4096,
                 max_update=15000, warmup=4000, lr=5e-4, dropout=0.3),
    "small": dict(layers=15, embed_dim=32, ffn_dim=64, heads=4, tokens_per_sample=32, max_tokens=512,
                  max_update=150, warmup=10, lr=2e-3, dropout=0.1),
    # a smoke test of the pipeline (tests/test_controlled.py), not an experiment
    "quick": dict(layers=2, embed_dim=16, ffn_dim=32, heads=2, tokens_per_sample=16, max_tokens=256,
                  max_update=4, warmup=2, lr=2e-3, dropout=0.1),
}
SYNTHETIC_SENTENCES = {"full": (4000, 300, 300), "small": (4000, 300, 300), "quick": (400, 40, 40)}


def run(cmd, log_path):
    """Run a fairseq command, its output into log_path; stop with its tail on failure.
    Returns (the output, seconds)."""
    t0 = time.time()
    code, output = run_logged(cmd, log_path)
    if code != 0:
        sys.exit(f"{os.path.basename(cmd[0])} failed ({code}), see {log_path}:\n{output[-3000:]}")
    return output, time.time() - t0


# ----------------------------------------------------------------------------- synthetic data


def write_synthetic_corpus(out_dir, seed=1, vocab=150, sentences=(4000, 300, 300)):
    """A word-level corpus from a random first-order Markov chain over pseudo-words: each word
    allows only 4 next words (weights 8:4:2:1, drawn Zipf-wise), so that context lowers
    perplexity (a model that knows the chain: about 3.1, far more for unigram statistics).
    Synthetic, for smoke runs: not Penn Treebank. Returns the chain's own perplexity on the
    test split's words, exp(mean -log p(word | previous word)) (end of sentence excluded)."""
    rng = random.Random(seed)
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = sorted({rng.choice(syll) + rng.choice(syll) + rng.choice(["", "n", "s"]) for _ in range(vocab * 4)})[:vocab]
    rng.shuffle(words)
    zipf = [1.0 / (r + 1) for r in range(vocab)]
    nexts = {}

    weights = [8, 4, 2, 1]

    def next_word(prev):
        if prev not in nexts:
            nexts[prev] = rng.choices(range(vocab), weights=zipf, k=4)
        word = rng.choices(nexts[prev], weights=weights)[0]
        # the chain's probability of this word (a successor may be drawn twice among the 4)
        return word, sum(w for n, w in zip(nexts[prev], weights) if n == word) / sum(weights)

    os.makedirs(out_dir, exist_ok=True)
    neg_log_p = []
    for split, n in zip(("train", "valid", "test"), sentences):
        with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
            for _ in range(n):
                prev, sent = -1, []
                for _ in range(rng.randint(6, 20)):
                    prev, p = next_word(prev)
                    sent.append(words[prev])
                    if split == "test":
                        neg_log_p.append(-math.log(p))
                f.write(" ".join(sent) + "\n")
    return math.exp(sum(neg_log_p) / len(neg_log_p))


# ----------------------------------------------------------------------------- the experiment


def train_flags(size, seed):
    s = size
    return [
        "--task", "language_modeling", "--arch", "transformer_lm_gpam_ptb",
        "--decoder-layers", str(s["layers"]), "--decoder-embed-dim", str(s["embed_dim"]),
        "--decoder-ffn-embed-dim", str(s["ffn_dim"]), "--decoder-attention-heads", str(s["heads"]),
        "--share-decoder-input-output-embed", "--dropout", str(s["dropout"]),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01", "--clip-norm", "0.0",
        "--lr", str(s["lr"]), "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(s["warmup"]),
        "--warmup-init-lr", "1e-07", "--tokens-per-sample", str(s["tokens_per_sample"]),
        "--sample-break-mode", "none", "--max-tokens", str(s["max_tokens"]), "--max-update", str(s["max_update"]),
        "--seed", str(seed), "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "10",
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-bin", help="binarised PTB (examples/ptb/ recipe output, fairseq-preprocess --only-source)")
    data.add_argument("--synthetic", action="store_true", help="generate a small synthetic word-level corpus (not PTB)")
    size_group = p.add_mutually_exclusive_group()
    size_group.add_argument("--small", action="store_true", help="CPU-sized model and budget (minutes) instead of the full size")
    size_group.add_argument("--quick", action="store_true",
                            help="a smoke test of the whole pipeline: 2 small layers, 4 updates, a smaller --synthetic corpus")
    p.add_argument("--attention-types", default=ALL_TYPES, help=f"comma list (default {ALL_TYPES})")
    p.add_argument("--seed", type=int, default=1, help="the one seed every run uses (default 1)")
    p.add_argument("--max-update", type=int, help="override the update budget of the chosen size")
    p.add_argument("--layers", type=int, help="override the number of layers (default 15)")
    p.add_argument("--analysis-batch", type=int, default=8, help="valid sentences for the collapse analysis (default 8)")
    p.add_argument("--extra-train-args", default="", help="more fairseq-train flags, identical for every type")
    p.add_argument("--reuse", action="store_true",
                   help="skip the training and evaluation of types whose checkpoint and logs are already in --out-dir")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)

    import shlex

    from gpam_fairseq.measurement.collapse import cli as collapse_cli
    from gpam_fairseq.measurement.collapse.output import plot, write_csv
    from gpam_fairseq.measurement.collapse.trained import TRAINED_FIELDS, read_trained_lambdas, summarise_trained

    size_name = "quick" if args.quick else "small" if args.small else "full"
    size = dict(SIZES[size_name])
    if args.max_update:
        size["max_update"] = args.max_update
    if args.layers:
        size["layers"] = args.layers
    types = [t.strip() for t in args.attention_types.split(",") if t.strip()]
    out = os.path.abspath(args.out_dir)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    data_bin = args.data_bin
    corpus_note = f"data: {data_bin}"
    if args.synthetic:
        raw = os.path.join(out, "synthetic_raw")
        data_bin = os.path.join(out, "synthetic_bin")
        print(f"| writing the synthetic corpus to {raw}", flush=True)
        chain_ppl = write_synthetic_corpus(raw, seed=args.seed, sentences=SYNTHETIC_SENTENCES[size_name])
        print(f"| the chain's own perplexity on the test words: {chain_ppl:.3f}", flush=True)
        if not os.path.exists(os.path.join(data_bin, "dict.txt")):
            run([fairseq_cli("fairseq-preprocess"), "--only-source", "--trainpref", f"{raw}/train.txt",
                 "--validpref", f"{raw}/valid.txt", "--testpref", f"{raw}/test.txt", "--destdir", data_bin,
                 "--workers", "1"], os.path.join(out, "logs", "preprocess.log"))
        corpus_note = (f"data: SYNTHETIC word-level corpus (first-order Markov chain over 150 pseudo-words, "
                       f"{SYNTHETIC_SENTENCES[size_name][0]:,} training sentences; not PTB; the chain's own perplexity "
                       f"on the test words, end of sentence excluded: {chain_ppl:.2f})")
    elif not os.path.exists(os.path.join(data_bin, "dict.txt")):
        sys.exit(f"--data-bin: {data_bin} has no dict.txt; run the PTB recipe in examples/ptb/ first")

    flags = train_flags(size, args.seed) + shlex.split(args.extra_train_args)
    results, checkpoints = [], []
    for i, t in enumerate(types, 1):
        save_dir = os.path.join(out, "ckpt", t)
        print(f"| [{i}/{len(types)}] training {t}: {size['layers']} layers, d={size['embed_dim']}, "
              f"{size['max_update']} updates, seed {args.seed}", flush=True)
        ckpt = os.path.join(save_dir, "checkpoint_best.pt")
        train_log, eval_log_path = (os.path.join(out, "logs", f"{t}.{s}.log") for s in ("train", "eval"))
        if args.reuse and all(os.path.exists(f) for f in (ckpt, train_log, eval_log_path)):
            print("|     reusing the checkpoint and logs already there (--reuse)", flush=True)
            log, eval_log = (open(f).read() for f in (train_log, eval_log_path))
            train_s = float("nan")
        else:
            log, train_s = run([fairseq_cli("fairseq-train"), data_bin, "--user-dir", USER_DIR, *flags,
                                "--attention-type", t, "--save-dir", save_dir], train_log)
            print(f"|     evaluating {t} on test", flush=True)
            eval_log, _ = run([fairseq_cli("fairseq-eval-lm"), data_bin, "--user-dir", USER_DIR, "--path", ckpt,
                               "--gen-subset", "test", "--tokens-per-sample", str(size["tokens_per_sample"]),
                               "--context-window", str(size["tokens_per_sample"] // 2), "--batch-size", "8"],
                              eval_log_path)
        epochs = log_records(log.splitlines(), "train")  # fairseq's training time, fresh or reused
        train_s = float(epochs[-1]["train_wall"]) if epochs else train_s
        loss2, ppl = read_eval_lm_output(eval_log)
        valid = log_records(log.splitlines(), "valid")
        results.append(dict(attention_type=t, parameters=parse_training_log(log)["params"], test_ppl=ppl,
                            test_loss_base2=loss2,
                            valid_ppl=float(valid[-1]["valid_ppl"]) if valid else None, train_seconds=round(train_s, 1)))
        checkpoints.append(ckpt)
        print(f"|     {t}: test perplexity {ppl}", flush=True)

    print("| collapse analysis of the trained checkpoints (valid split)", flush=True)
    a_args = collapse_cli.get_parser().parse_args(
        ["--checkpoint", *checkpoints, "--data-bin", data_bin, "--split", "valid",
         "--batch-size", str(args.analysis_batch), "--out-prefix", os.path.join(out, "collapse")])
    rows = collapse_cli.run(a_args)
    write_csv(rows, os.path.join(out, "collapse.csv"))
    plot(rows, os.path.join(out, "collapse.png"),
         title=f"trained {size['layers']}-layer LMs ({size_name} size), valid batch")
    # daGPAM trained with --gpam-trainable-lambda: its learned lambdas, per module or head
    trained = [r for ckpt in checkpoints for r in read_trained_lambdas(ckpt)]
    if trained:
        write_csv(trained, os.path.join(out, "trained_lambda.csv"), TRAINED_FIELDS)
        print("\n".join(summarise_trained(trained)))
        print(f"| wrote {out}/trained_lambda.csv (the learned lambdas; scripts/analyze_collapse.py --trained-lambda "
              f"{out} marks them on the lambda map)", flush=True)
    last = {r["attention_type"]: r for r in rows if int(r["layer"]) == size["layers"]}
    for r in results:
        lr = last.get(r["attention_type"], {})
        r["residual_ratio_last_layer"] = lr.get("residual_ratio")
        r["mean_cosine_last_layer"] = lr.get("mean_cosine")
        grads = [x["grad_norm_wq"] for x in rows if x["attention_type"] == r["attention_type"] and x["grad_norm_wq"] is not None]
        r["grad_norm_wq_first_over_last"] = grads[0] / grads[-1] if grads and grads[-1] else None

    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"Size: {'small (CPU)' if args.small else size_name}: {size['layers']} layers, d={size['embed_dim']}, "
        f"FFN {size['ffn_dim']}, {size['heads']} heads, context {size['tokens_per_sample']}, "
        f"{size['max_update']} updates of <= {size['max_tokens']} tokens, seed {args.seed}. {corpus_note}.",
        "",
        "| attention | parameters | valid ppl | test ppl | residual ratio, last layer | cosine, last layer | ‖∂L/∂W_Q‖ layer 1 / layer L | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['attention_type']} | {fmt(r['parameters'], ',')} | {fmt(r['valid_ppl'], '.2f')} | "
                     f"{fmt(r['test_ppl'], '.2f')} | {fmt(r['residual_ratio_last_layer'], '.3g')} | "
                     f"{fmt(r['mean_cosine_last_layer'], '.3f')} | {fmt(r['grad_norm_wq_first_over_last'], '.3g')} | "
                     f"{r['train_seconds']} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"| wrote {out}/results.md, results.csv, collapse.csv, collapse.png")


if __name__ == "__main__":
    main()
