"""Cost of the daGPAM tensorboard scalars: training words/s with --gpam-stats-interval 0 / 10 / 1.

In-process, one thread, CPU time of this process (robust on a shared machine): builds a
shrunk transformer_gpam_iwslt_de_en (the demo's size: 2+2 layers, d=64, 4 heads, trainable
lambda) and runs forward+backward+Adam steps inside fairseq's metrics aggregation contexts
exactly as fairseq-train does (set_num_updates after every step), on random batches of
32 sentences x 20 tokens. Interleaves the settings and repeats them.
    python scripts/gpam_stats_cost.py [--steps 200] [--repeats 3]
"""
import argparse
import time

import torch

from gpam_fairseq.fairseq_tools import build_translation_model  # first: gpam_fairseq imports fairseq quietly
from fairseq.logging import metrics

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--bsz", type=int, default=32)
ap.add_argument("--len", type=int, default=20)
a = ap.parse_args()
torch.set_num_threads(1)
SMALL = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
         "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "4",
         "--decoder-attention-heads", "4", "--gpam-trainable-lambda", "--share-decoder-input-output-embed"]


def run(interval):
    torch.manual_seed(0)
    model = build_translation_model("transformer_gpam_iwslt_de_en", SMALL + ["--gpam-stats-interval", str(interval)], 1000, 1000)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(4, 1000, (a.bsz, a.len), generator=g), torch.randint(4, 1000, (a.bsz, a.len), generator=g))
               for _ in range(8)]
    words = 0
    t0 = time.process_time()
    with metrics.aggregate("train"):
        for step in range(a.steps):
            src, tgt = batches[step % 8]
            with metrics.aggregate("train_inner"):
                out = model(src, torch.full((a.bsz,), a.len), tgt)[0]
                loss = torch.nn.functional.cross_entropy(out.view(-1, out.size(-1)), tgt.view(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.set_num_updates(step + 1)
            words += tgt.numel()
    return words / (time.process_time() - t0)


rates = {0: [], 10: [], 1: []}
for r in range(a.repeats):
    for interval in rates:
        rates[interval].append(run(interval))
        print(f"repeat {r + 1}: interval {interval}: {rates[interval][-1]:,.0f} words/s (CPU time)", flush=True)
best = {k: max(v) for k, v in rates.items()}
print("| --gpam-stats-interval | words/s (best of %d) | vs off |" % a.repeats)
print("| --- | ---: | ---: |")
for k in (0, 10, 1):
    print(f"| {k} | {best[k]:,.0f} | {best[k] / best[0]:.3f} |")
