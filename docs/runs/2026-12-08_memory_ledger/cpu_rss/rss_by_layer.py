"""Where a CPU training step's resident memory goes: one IWSLT-size forward + backward (128 x 32 tokens,
--dropout 0.3, fp32), stock or daGPAM, with the bytes autograd really keeps (saved-tensor hooks, this
CPU's own SDPA kernels, one count per storage, parameters excluded), the resident set after each layer's
forward and at the loss, and the peak after the backward pass.

    python docs/runs/2026-12-08_memory_ledger/cpu_rss/rss_by_layer.py stock|dagpam
    MALLOC_MMAP_THRESHOLD_=65536 python ... stock|dagpam   # glibc's mmap threshold fixed (not adaptive)
"""
import resource
import sys

import torch

from gpam_fairseq.measurement.benchmark import inputs

variant = sys.argv[1]
shape = {s.name: s for s in inputs.FULL_SHAPES}["iwslt"]
arch = shape.stock_arch if variant == "stock" else shape.gpam_arch
extra = ("--dropout", "0.3") + (() if variant == "stock" else ("--attention-type", "dagpam"))
model, dictionary = inputs.build_model(shape, arch, extra)
model.train()
loss, _ = inputs.training_loss(model, shape, 128, 32, dictionary, "cpu", torch.Generator().manual_seed(1))


def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


marks = []
for name, module in model.named_modules():
    if name.count(".") == 2 and ".layers." in name:
        module.register_forward_hook(lambda m, i, o, name=name: marks.append((name, round(rss()))))
saved = {}


def pack(t):
    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t


params = {p.untyped_storage().data_ptr() for p in model.parameters()}
start = rss()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    value = loss()
at_loss = rss()
value.backward()
kept = sum(n for p, n in saved.items() if p not in params) / 2**20
print(f"{variant}: saved for backward {kept:,.1f} MiB; resident MiB: before {start:,.0f}, "
      + ", ".join(f"{n} {r:,}" for n, r in marks) + f", at the loss {at_loss:,.0f}; "
      f"peak (ru_maxrss) after the backward pass {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f}")
