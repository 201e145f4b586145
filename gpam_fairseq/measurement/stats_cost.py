"""Cost of the daGPAM tensorboard scalars: training words/s with --gpam-stats-interval 0 / 10 / 1.

In-process, one thread, CPU time of this process (robust on a shared machine): builds a
shrunk transformer_gpam_iwslt_de_en (the demo's size: 2+2 layers, d=64, 4 heads, trainable
lambda) and runs forward+backward+Adam steps inside fairseq's metrics aggregation contexts
exactly as fairseq-train does (set_num_updates after every step), on random batches of
32 sentences x 20 tokens. Interleaves the settings and repeats them.
    python scripts/gpam_stats_cost.py [--steps 200] [--repeats 3]
    python scripts/gpam_stats_cost.py --quick     # 10 steps, 1 repeat: checks that it runs
"""
import argparse
import time

import torch

from gpam_fairseq.fairseq_glue.tools import build_translation_model  # first: gpam_fairseq imports fairseq quietly
from gpam_fairseq.fairseq_glue.cli_errors import refusals_exit_2
from fairseq.logging import metrics

SMALL = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
         "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "4",
         "--decoder-attention-heads", "4", "--gpam-trainable-lambda", "--share-decoder-input-output-embed"]
INTERVALS = (0, 10, 1)


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bsz", type=int, default=32)
    ap.add_argument("--len", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="10 steps, 1 repeat (a smoke test; its figures mean nothing)")
    return ap


def run(a, interval):
    """Words/s (CPU time) of a.steps training steps with --gpam-stats-interval interval; the scalars logged."""
    torch.manual_seed(0)
    model = build_translation_model("transformer_gpam_iwslt_de_en", SMALL + ["--gpam-stats-interval", str(interval)], 1000, 1000)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(4, 1000, (a.bsz, a.len), generator=g), torch.randint(4, 1000, (a.bsz, a.len), generator=g))
               for _ in range(8)]
    words = logged = 0
    t0 = time.process_time()
    with metrics.aggregate("train"):
        for step in range(a.steps):
            src, tgt = batches[step % 8]
            with metrics.aggregate("train_inner") as inner:
                out = model(src, torch.full((a.bsz,), a.len), tgt)[0]
                loss = torch.nn.functional.cross_entropy(out.view(-1, out.size(-1)), tgt.view(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
            logged += any(key.startswith("gpam/") and inner[key].count for key in inner.keys())  # this update's
            metrics.reset_meters("train_inner")  # as fairseq-train after each logged interval
            model.set_num_updates(step + 1)
            words += tgt.numel()
    return words / (time.process_time() - t0), logged


@refusals_exit_2
def main(argv=None):
    a = get_parser().parse_args(argv)
    if a.quick:
        a.steps, a.repeats = 10, 1
    torch.set_num_threads(1)
    rates = {k: [] for k in INTERVALS}
    for r in range(a.repeats):
        for interval in rates:
            rate, logged = run(a, interval)
            rates[interval].append(rate)
            print(f"repeat {r + 1}: interval {interval}: {rate:,.0f} words/s (CPU time), "
                  f"{logged} updates with daGPAM scalars", flush=True)
    best = {k: max(v) for k, v in rates.items()}
    print("| --gpam-stats-interval | words/s (best of %d) | vs off |" % a.repeats)
    print("| --- | ---: | ---: |")
    for k in INTERVALS:
        print(f"| {k} | {best[k]:,.0f} | {best[k] / best[0]:.3f} |")


if __name__ == "__main__":
    main()
