"""`make demo`: softmax vs daGPAM on a small synthetic translation task, end to end.

Offline and deterministic. Generates a synthetic parallel corpus (a toy task: every word
goes through a fixed dictionary and the word order is reversed), binarises it with
fairseq-preprocess, trains a shrunk `transformer_gpam_iwslt_de_en` twice with identical
settings, once with `--attention-type softmax` (the stock Transformer) and once with
`--attention-type dagpam`, translates the test set with beam 5, scores it with sacreBLEU,
and prints one table. Everything runs through the stock fairseq command lines with
`--user-dir gpam_fairseq`, exactly as a user would run them.

Same result on every run: the corpus, the seeds and the data order are fixed, and the
fairseq commands run with their floating-point arithmetic pinned (see PINNED_ARITHMETIC):
one thread (a sum split over N threads rounds differently for each N), and on x86-64 CPUs with
AVX2 torch's AVX2 kernels and MKL's AVX2 code branch (an AVX-512 CPU would otherwise round
differently from an AVX2 one, and MKL picks its kernels per CPU). Other CPU families (ARM) and
other torch/MKL versions compute other roundings, hence other numbers.

    python examples/quickstart/demo.py [--out runs/demo] [--max-update 700] [--seed 1]
"""

import argparse
import json
import os
import shutil
import sys
import time

from gpam_fairseq.fairseq_tools import (  # noqa: F401  (log_records: scripts/benchmark_fairseq_train.py imports it from here)
    USER_DIR, fairseq_cli, log_records, parse_training_log, read_generate_output, run_logged, say, training_progress)
from gpam_fairseq.synthetic_corpus import SRC_LANG, TGT_LANG, write_corpus

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

SYSTEMS = ("softmax", "dagpam")

# A shrunk transformer_iwslt_de_en; both systems get exactly these settings.
MODEL_ARGS = [
    "--arch", "transformer_gpam_iwslt_de_en",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--share-decoder-input-output-embed",
]
TRAIN_ARGS = [
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
    "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "200",
    "--dropout", "0.1", "--weight-decay", "0.0001",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--max-tokens", "4096",
    "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "50",
]
# Environment of the fairseq commands (see the docstring); the caller's settings of these
# variables are overridden. The x86 ones only on a CPU with AVX2 (AVX-512 CPUs have it too).
PINNED_ARITHMETIC = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PINNED_ARITHMETIC_X86 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def pinned_environment():
    """This process's environment with the arithmetic of the fairseq commands pinned."""
    import torch

    env = {**os.environ, **PINNED_ARITHMETIC}
    # the hardware's support, not torch.backends.cpu.get_cpu_capability(), which follows the
    # caller's ATEN_CPU_CAPABILITY
    if getattr(torch.cpu, "_is_avx2_supported", lambda: False)():
        env.update(PINNED_ARITHMETIC_X86)
    return env


# fairseq-fixed drops the sentences of a last batch that is not a multiple of
# --required-batch-size-multiple (default 8); 1 keeps every test sentence.
GENERATE_ARGS = ["--beam", "5", "--batch-size", "128", "--required-batch-size-multiple", "1"]


def run(step: str, cmd, log_path: str, echo=None) -> str:
    """Run a fairseq CLI (arithmetic pinned), logging to log_path; echo(line) picks lines to show as progress."""
    code, text = run_logged(cmd, log_path, echo, env=pinned_environment())
    if code != 0:
        tail = "".join(text.splitlines(keepends=True)[-25:])
        sys.exit(f"demo: step '{step}' failed (exit {code}); last lines of {log_path}:\n{tail}")
    return text


def score(hyps, refs):
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "bleu_signature": str(bleu.get_signature()), "chrf": c.score, "chrf_signature": str(chrf.get_signature())}


def write_run_folder(run_dir, system, row, hyps, refs, seed=1):
    """The run folder that the recipes' evaluate stage writes (gpam_fairseq/recipes/stages.py), so
    that scripts/compare_runs.py can compare the demo's two systems too."""
    os.makedirs(run_dir)
    for name, lines in (("hyps.txt", hyps), ("refs.txt", refs)):
        with open(os.path.join(run_dir, name), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    run = {"recipe": "demo (synthetic toy task)", "task": "translation", "system": f"demo_{system}_seed{seed}",
           "group": f"demo {system}", "model": system, "attention_type": system, "seed": seed,
           "params": row["params"], "train_wps": row["wps"], "bleu": row["bleu"], "bleu_signature": row["bleu_signature"],
           "chrf": row["chrf"], "chrf_signature": row["chrf_signature"], "bleu_lowercase": False, "sentences": len(hyps),
           "files": {"hyps": "hyps.txt", "refs": "refs.txt", "tensorboard": os.path.join("..", "..", "tensorboard", system)}}
    with open(os.path.join(run_dir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(run, f, indent=1)


def format_table(rows, baseline_params):
    lines = [
        "| system | attention | BLEU | chrF | parameters | extra vs softmax | train words/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        extra = (r["params"] - baseline_params) / baseline_params * 100 if baseline_params else float("nan")
        lines.append(
            f"| {r['system']} | {r['attention']} | {r['bleu']:.2f} | {r['chrf']:.2f} | "
            f"{r['params']:,} | {extra:+.2f} % | {r['wps']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "demo"), help="output folder (replaced)")
    parser.add_argument("--max-update", type=int, default=700, help="training updates per system")
    parser.add_argument("--train-size", type=int, default=20000, help="synthetic training pairs")
    parser.add_argument("--test-size", type=int, default=500, help="synthetic test pairs")
    parser.add_argument("--seed", type=int, default=1, help="fairseq-train --seed of both systems (the corpus stays the same)")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    start = time.time()

    env = pinned_environment()
    say(f"      arithmetic pinned for the same result on every run: "
        f"{', '.join(f'{k}={env[k]}' for k in (*PINNED_ARITHMETIC, *PINNED_ARITHMETIC_X86) if k in env)}")
    say(f"[1/4] synthetic corpus -> {out}/raw")
    say("      NOTE: a toy task, not real translation: each source word maps to one target word and the order is reversed")
    write_corpus(os.path.join(out, "raw"), n_train=args.train_size, n_valid=args.test_size, n_test=args.test_size)

    say("[2/4] fairseq-preprocess")
    raw = lambda split: os.path.join(out, "raw", split)
    data_bin = os.path.join(out, "data-bin")
    run(
        "fairseq-preprocess",
        [fairseq_cli("fairseq-preprocess"), "--source-lang", SRC_LANG, "--target-lang", TGT_LANG,
         "--trainpref", raw("train"), "--validpref", raw("valid"), "--testpref", raw("test"),
         "--destdir", data_bin, "--workers", "2"],
        os.path.join(out, "preprocess.log"),
    )

    rows = []
    for i, system in enumerate(SYSTEMS):
        save_dir = os.path.join(out, "checkpoints", system)
        tb_dir = os.path.join(out, "tensorboard", system)
        say(f"[3/4] fairseq-train --attention-type {system} ({args.max_update} updates, {i + 1}/{len(SYSTEMS)})")
        train_log = run(
            f"fairseq-train ({system})",
            [fairseq_cli("fairseq-train"), data_bin, "--user-dir", USER_DIR, *MODEL_ARGS,
             "--attention-type", system, *TRAIN_ARGS, "--seed", str(args.seed), "--max-update", str(args.max_update),
             "--save-dir", save_dir, "--tensorboard-logdir", tb_dir],
            os.path.join(out, f"train_{system}.log"),
            echo=training_progress(system),
        )
        say(f"[4/4] fairseq-generate --beam 5 ({system})")
        gen_log = run(
            f"fairseq-generate ({system})",
            [fairseq_cli("fairseq-generate"), data_bin, "--user-dir", USER_DIR,
             "--path", os.path.join(save_dir, "checkpoint_best.pt"), "--gen-subset", "test", *GENERATE_ARGS],
            os.path.join(out, f"generate_{system}.log"),
        )
        hyps, refs = read_generate_output(gen_log)
        with open(os.path.join(out, f"test_{system}.hyp"), "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps)
        rows.append({"system": f"transformer_gpam_iwslt_de_en (shrunk), {system}", "attention": system,
                     **parse_training_log(train_log), **score(hyps, refs)})
        write_run_folder(os.path.join(out, "runs", system), system, rows[-1], hyps, refs, args.seed)

    table = format_table(rows, rows[0]["params"])
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)

    say("")
    say(f"Results on the synthetic toy task (test set, {args.test_size} sentences, beam 5, seed {args.seed}):")
    say(table)
    say(f"BLEU signature: {rows[0]['bleu_signature']}")
    say(f"chrF signature: {rows[0]['chrf_signature']}")
    say("train words/s: median of fairseq's logged wps (target tokens per second, validation excluded).")
    say(f"tensorboard logs: {os.path.join(out, 'tensorboard')}  (tensorboard --logdir {os.path.join(out, 'tensorboard')})")
    say(f"logs, checkpoints, hypotheses and results.md: {out}")
    say(f"run folders for scripts/compare_runs.py: python scripts/compare_runs.py --baseline "
        f"{os.path.join(out, 'runs', SYSTEMS[0])} {os.path.join(out, 'runs', SYSTEMS[1])}")
    say(f"demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
