#!/usr/bin/env python
"""Speed and memory of every attention we ship, side by side with stock fairseq attention.

One process, the same inputs for every row, four levels:

* ``core``: the attention core alone, forward + backward, on per-head (B, H, T, d_h)
  tensors: one ``scaled_dot_product_attention`` call (the baseline of the issue's stretch
  target, daGPAM core <= 1.3x one SDPA call) against each mechanism's fused and explicit path.
* ``attention``: one attention module, forward + backward, at the shapes of the paper's
  setups (``iwslt``: ~4096 tokens, d=512, 4 heads, encoder self-attention with padding;
  ``wmt_big``: ~3584 tokens, d=1024, 16 heads, same; ``lm512`` / ``lm3072``: d=1024,
  8 heads, causal decoder self-attention). Rows: stock ``fairseq.modules.MultiheadAttention``
  (its fast path, and with ``need_weights=True``), then every mechanism registered in
  ``gpam_fairseq.attention.mechanisms.MECHANISMS`` at run time, each on its fused path
  (no weights requested) and its explicit path (weights requested).
* ``train``: one training step (forward, cross-entropy, backward, Adam step) of the
  matching architectures: ``transformer_iwslt_de_en`` / ``transformer_vaswani_wmt_en_de_big``
  / ``transformer_lm`` (stock) against our ``transformer_gpam_*`` / ``transformer_lm_gpam``
  with each ``--attention-type``.
* ``beam``: beam search (beam 5) through fairseq's ``SequenceGenerator`` for the NMT
  architectures, every hypothesis forced to the same length so that all rows do the same work.

Each row reports the median wall time over ``--repeats`` timed calls (the variants of one
group are interleaved round by round, so that background load hits them alike), the peak
memory and, above all, the ratio to the stock row of its group. Peak memory is CUDA's
``max_memory_allocated`` during one call, minus what was allocated before it (activations,
gradients, workspaces; not the weights). On a CPU there is no honest per-call figure
(tracemalloc does not see torch's allocator): the column says ``n/a``.

    python scripts/benchmark.py --device cuda                 # the GPU table (fp32, fp16, bf16)
    python scripts/benchmark.py --device cpu --dtypes fp32    # the CPU table
    python scripts/benchmark.py --quick                       # tiny CPU smoke run (the tests)

Writes ``benchmark.csv``, ``benchmark.md`` and ``benchmark.png`` into ``--out-dir``.
"""

import argparse
import csv
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LEVELS = ("core", "attention", "train", "beam")
BEAM = 5


@dataclass(frozen=True)
class Shape:
    """One benchmark setting. ``tokens`` = batch * length; NMT batches are padded."""

    name: str
    batch: int
    length: int
    embed_dim: int
    heads: int
    causal: bool
    # whole-model level: stock architecture, ours, vocabulary, extra architecture flags
    stock_arch: str
    gpam_arch: str
    vocab: int
    arch_flags: tuple = ()
    beam_sentences: int = 0  # 0: no beam-search level (language models)
    beam_length: int = 0


# Real sizes: the paper's setups. Vocabularies as fairseq's recipes produce them.
FULL_SHAPES = (
    Shape("iwslt", 128, 32, 512, 4, False, "transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en",
          8848, ("--share-decoder-input-output-embed",), beam_sentences=128, beam_length=32),
    Shape("wmt_big", 112, 32, 1024, 16, False, "transformer_vaswani_wmt_en_de_big",
          "transformer_gpam_vaswani_wmt_en_de_big", 32768, ("--share-all-embeddings",),
          beam_sentences=128, beam_length=32),
    Shape("lm512", 4, 512, 1024, 8, True, "transformer_lm", "transformer_lm_gpam", 267744,
          ("--share-decoder-input-output-embed",)),
    Shape("lm3072", 1, 3072, 1024, 8, True, "transformer_lm", "transformer_lm_gpam", 267744,
          ("--share-decoder-input-output-embed",)),
)

# --quick: the same four settings shrunk until the whole run takes seconds on a CPU.
_TINY = ("--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
         "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
         "--encoder-attention-heads", "4", "--decoder-attention-heads", "4")
_TINY_LM = ("--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
            "--decoder-attention-heads", "4")
QUICK_SHAPES = (
    Shape("iwslt", 4, 12, 32, 4, False, "transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en",
          60, ("--share-decoder-input-output-embed",) + _TINY, beam_sentences=3, beam_length=5),
    Shape("wmt_big", 4, 12, 64, 16, False, "transformer_vaswani_wmt_en_de_big",
          "transformer_gpam_vaswani_wmt_en_de_big", 60, ("--share-all-embeddings",) + _TINY,
          beam_sentences=3, beam_length=5),
    Shape("lm512", 2, 16, 64, 8, True, "transformer_lm", "transformer_lm_gpam", 60,
          ("--share-decoder-input-output-embed",) + _TINY_LM),
    Shape("lm3072", 1, 48, 64, 8, True, "transformer_lm", "transformer_lm_gpam", 60,
          ("--share-decoder-input-output-embed",) + _TINY_LM),
)

FIELDS = ("level", "shape", "device", "dtype", "variant", "path", "batch", "length", "embed_dim",
          "heads", "causal", "median_ms", "throughput", "throughput_unit", "peak_mem_mb",
          "time_ratio", "mem_ratio", "note")


@dataclass
class Variant:
    """A row of a group: ``setup`` builds it and returns the callable to time."""

    name: str
    path: str
    setup: Callable[[], Callable[[], None]]
    work: float = 0.0  # tokens or sentences per call, for the throughput column
    unit: str = ""


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mechanism_names() -> List[str]:
    """Every attention type registered at run time, softmax first."""
    from gpam_fairseq.attention.mechanisms import MECHANISMS

    return sorted(MECHANISMS, key=lambda n: (n != "softmax", n != "dagpam", n))


# ----------------------------------------------------------------------------- inputs


def padded_lengths(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Sentence lengths between half and all of ``length``; the longest is ``length``."""
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=gen)
    lengths[0] = length
    return lengths


def future_mask(t: int, dtype: torch.dtype, device) -> torch.Tensor:
    """fairseq's decoder mask: float -inf above the diagonal."""
    return torch.triu(torch.full((t, t), float("-inf"), dtype=dtype, device=device), 1)


# ----------------------------------------------------------------------------- attention level


def attention_variants(shape: Shape, dtype: torch.dtype, device) -> List[Variant]:
    from fairseq.modules import MultiheadAttention

    from gpam_fairseq.modules.transformer import build_attention
    from gpam_fairseq.options import GPAMOptions

    gen = torch.Generator().manual_seed(0)
    B, T, E = shape.batch, shape.length, shape.embed_dim
    x = torch.randn(T, B, E, generator=gen).to(device=device, dtype=dtype)
    if shape.causal:
        kpm, attn_mask = None, future_mask(T, dtype, device)
    else:  # encoder self-attention over a left-padded batch, as fairseq's source side
        lengths = padded_lengths(B, T, gen)
        kpm = (torch.arange(T).unsqueeze(0) < (T - lengths).unsqueeze(1)).to(device)
        attn_mask = None
    x.requires_grad_(True)
    tokens = float(B * T)

    def setup_for(make_module, need_weights: bool):
        def setup():
            module = make_module().to(device=device, dtype=dtype).train()

            def step():
                x.grad = None
                module.zero_grad(set_to_none=True)
                out, _ = module(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights)
                out.float().sum().backward()

            return step

        return setup

    role = "dec_self" if shape.causal else "enc_self"
    variants = [
        Variant("stock", "fast", setup_for(lambda: MultiheadAttention(E, shape.heads, self_attention=True), False), tokens, "tokens/s"),
        Variant("stock", "weights", setup_for(lambda: MultiheadAttention(E, shape.heads, self_attention=True), True), tokens, "tokens/s"),
    ]
    for name in mechanism_names():
        make = lambda name=name: build_attention(role, GPAMOptions(attention_type=name), E, shape.heads, self_attention=True)
        variants.append(Variant(name, "fused", setup_for(make, False), tokens, "tokens/s"))
        variants.append(Variant(name, "explicit", setup_for(make, True), tokens, "tokens/s"))
    return variants


def core_variants(shape: Shape, dtype: torch.dtype, device) -> List[Variant]:
    from gpam_fairseq.attention.mechanisms import build_mechanism
    from gpam_fairseq.options import GPAMOptions

    gen = torch.Generator().manual_seed(0)
    B, T, heads = shape.batch, shape.length, shape.heads
    d_h = shape.embed_dim // heads
    q, k, v = (torch.randn(B, heads, T, d_h, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
               for _ in range(3))
    if shape.causal:
        bias = future_mask(T, dtype, device).view(1, 1, T, T)
    else:
        lengths = padded_lengths(B, T, gen)
        pad = torch.arange(T).unsqueeze(0) < (T - lengths).unsqueeze(1)
        bias = torch.zeros(B, 1, 1, T).masked_fill(pad.view(B, 1, 1, T), float("-inf")).to(device=device, dtype=dtype)
    tokens = float(B * T)

    def backward(out):
        for t in (q, k, v):
            t.grad = None
        out.float().sum().backward()

    def sdpa():
        return lambda: backward(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))

    def setup_for(name, need_weights):
        def setup():
            mechanism = build_mechanism(name, heads, d_h, GPAMOptions(attention_type=name)).to(device=device, dtype=dtype)
            return lambda: backward(mechanism(q, k, v, bias, 0.0, need_weights)[0])

        return setup

    variants = [Variant("sdpa", "one call", sdpa, tokens, "tokens/s")]
    for name in mechanism_names():
        variants.append(Variant(name, "fused", setup_for(name, False), tokens, "tokens/s"))
        variants.append(Variant(name, "explicit", setup_for(name, True), tokens, "tokens/s"))
    return variants


# ----------------------------------------------------------------------------- model levels


def build_model(shape: Shape, arch: str, extra=()):
    """A model built the way fairseq-train builds it, with dictionaries of the real size."""
    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.tasks.language_modeling import LanguageModelingTask
    from fairseq.tasks.translation import TranslationTask

    import gpam_fairseq  # noqa: F401  (registers our models)

    dictionary = Dictionary()
    for i in range(shape.vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    lm = shape.beam_sentences == 0
    task_flags = (["--task", "language_modeling", "--tokens-per-sample", str(shape.length)] if lm
                  else ["--task", "translation", "-s", "src", "-t", "tgt"])
    cli = ["/nonexistent-data", *task_flags, "--arch", arch, *shape.arch_flags, *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), cli)
    cfg = convert_namespace_to_omegaconf(args)
    if lm:
        task = LanguageModelingTask(cfg.task, dictionary, dictionary, targets=["future"])
    else:
        task = TranslationTask(cfg.task, dictionary, dictionary)
    return task.build_model(cfg.model), dictionary


# Built models, reused by every dtype and by the beam level after the train level (building
# a WMT-big or a 267k-word LM takes seconds; the weights' values do not matter for timing).
# Each group casts its models to its device and dtype, and they go back to fp32 on the CPU
# afterwards so that one group's GPU memory is free for the next.
_MODEL_CACHE: Dict[tuple, tuple] = {}


def cached_model(shape: Shape, arch: str, extra=()):
    key = (shape.name, shape.length, shape.vocab, shape.arch_flags, arch, tuple(extra))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = build_model(shape, arch, extra)
    return _MODEL_CACHE[key]


def park_models() -> None:
    for model, _ in _MODEL_CACHE.values():
        model.to(device="cpu", dtype=torch.float32)


def model_arms(shape: Shape):
    """(variant name, architecture, extra flags): stock first, then every attention type."""
    arms = [("stock", shape.stock_arch, ())]
    arms += [(n, shape.gpam_arch, ("--attention-type", n)) for n in mechanism_names()]
    return arms


def nmt_batch(shape: Shape, dictionary, device, gen: torch.Generator):
    B, T = shape.batch, shape.length
    pad, eos = dictionary.pad(), dictionary.eos()
    low = dictionary.nspecial
    src_len, tgt_len = padded_lengths(B, T, gen), padded_lengths(B, T, gen)
    src = torch.full((B, T), pad, dtype=torch.long)
    tgt = torch.full((B, T), pad, dtype=torch.long)
    prev = torch.full((B, T), pad, dtype=torch.long)
    for i in range(B):
        s, t = int(src_len[i]), int(tgt_len[i])
        src[i, T - s:] = torch.randint(low, len(dictionary), (s,), generator=gen)  # left padded
        src[i, -1] = eos
        tgt[i, :t] = torch.randint(low, len(dictionary), (t,), generator=gen)  # right padded
        tgt[i, t - 1] = eos
        prev[i, 0] = eos
        prev[i, 1:t] = tgt[i, : t - 1]
    return src.to(device), src_len.to(device), prev.to(device), tgt.to(device)


def train_variants(shape: Shape, dtype: torch.dtype, device) -> List[Variant]:
    def setup_for(arch, extra):
        def setup():
            model, dictionary = cached_model(shape, arch, extra)
            model = model.to(device=device, dtype=dtype).train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-4)
            gen = torch.Generator().manual_seed(1)
            pad = dictionary.pad()
            if shape.beam_sentences:
                src, src_len, prev, tgt = nmt_batch(shape, dictionary, device, gen)
                forward = lambda: model(src, src_len, prev)[0]
            else:
                tokens = torch.randint(dictionary.nspecial, len(dictionary), (shape.batch, shape.length + 1), generator=gen).to(device)
                src, tgt = tokens[:, :-1], tokens[:, 1:]
                forward = lambda: model(src)[0]

            def step():
                opt.zero_grad(set_to_none=True)
                logits = forward()
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt.reshape(-1), ignore_index=pad)
                loss.backward()
                opt.step()

            setup.words = float(tgt.ne(pad).sum())
            return step

        return setup

    variants = []
    for name, arch, extra in model_arms(shape):
        setup = setup_for(arch, extra)
        variants.append(Variant(name, "train", setup, 0.0, "words/s"))
    return variants


def beam_variants(shape: Shape, dtype: torch.dtype, device) -> List[Variant]:
    from fairseq.sequence_generator import SequenceGenerator

    def setup_for(arch, extra):
        def setup():
            model, dictionary = cached_model(shape, arch, extra)
            model = model.to(device=device, dtype=dtype).eval()
            # what fairseq-generate does (beamable cross attention, no alignment output)
            model.make_generation_fast_(beamable_mm_beam_size=BEAM, need_attn=False)
            # every hypothesis gets exactly beam_length tokens: equal work in every row
            generator = SequenceGenerator([model], dictionary, beam_size=BEAM, max_len_a=0,
                                          max_len_b=shape.beam_length, min_len=shape.beam_length)
            gen = torch.Generator().manual_seed(2)
            big = Shape(**{**shape.__dict__, "batch": shape.beam_sentences})
            src, src_len, _, _ = nmt_batch(big, dictionary, device, gen)
            sample = {"net_input": {"src_tokens": src, "src_lengths": src_len}}

            def step():
                with torch.no_grad():
                    generator.generate([model], sample)

            return step

        return setup

    return [Variant(name, "beam5", setup_for(arch, extra), float(shape.beam_sentences), "sentences/s")
            for name, arch, extra in model_arms(shape)]


# ----------------------------------------------------------------------------- measuring


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_group(level: str, shape: Shape, dtype_name: str, device, variants: List[Variant],
              warmup: int, repeats: int) -> List[dict]:
    """Warm every variant up, take each one's peak memory alone, then time them round by round."""
    steps: Dict[int, Callable] = {}
    notes: Dict[int, str] = {}
    for i, var in enumerate(variants):
        try:
            steps[i] = var.setup()
            words = getattr(var.setup, "words", None)
            if words:
                var.work = words
            for _ in range(warmup):
                steps[i]()
        except Exception as exc:  # one broken variant must not hide the others
            steps.pop(i, None)
            notes[i] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(f"  {level}/{shape.name}/{dtype_name} {var.name}/{var.path}: {notes[i]}")
    peak: Dict[int, float] = {}
    for i, step in steps.items():
        if device.type == "cuda":
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            synchronize(device)
            peak[i] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times: Dict[int, List[float]] = {i: [] for i in steps}
    for _ in range(repeats):
        for i, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times[i].append(time.perf_counter() - t0)
    rows = []
    for i, var in enumerate(variants):
        median = statistics.median(times[i]) if i in times else float("nan")
        rows.append(dict(
            level=level, shape=shape.name, device=device.type, dtype=dtype_name, variant=var.name,
            path=var.path, batch=shape.beam_sentences if level == "beam" else shape.batch,
            length=shape.beam_length if level == "beam" else shape.length, embed_dim=shape.embed_dim,
            heads=shape.heads, causal=shape.causal, median_ms=median * 1e3,
            throughput=var.work / median if var.work and median == median else float("nan"),
            throughput_unit=var.unit, peak_mem_mb=peak.get(i, float("nan")), note=notes.get(i, ""),
        ))
    # ratios to the first row of the group: stock fairseq (its fast path at the attention
    # level), or one SDPA call at the core level
    stock = rows[0] if rows[0]["variant"] in ("stock", "sdpa") else None
    for r in rows:
        r["time_ratio"] = r["median_ms"] / stock["median_ms"] if stock else float("nan")
        r["mem_ratio"] = (r["peak_mem_mb"] / stock["peak_mem_mb"]
                          if stock and stock["peak_mem_mb"] > 0 else float("nan"))
    return rows


# ----------------------------------------------------------------------------- output


def fmt(value, digits=2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    return str(value)


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("n/a" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in FIELDS})


def markdown_table(rows: List[dict]) -> str:
    head = ("| level | shape | dtype | variant | path | B×T | median ms | throughput | peak MiB | × stock time | × stock mem |\n"
            "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        tp = (f"{fmt(r['throughput'], 0 if r['throughput'] >= 100 else 2)} {r['throughput_unit']}"
              if r["throughput"] == r["throughput"] else "n/a")
        lines.append(
            f"| {r['level']} | {r['shape']} | {r['dtype']} | {r['variant']} | {r['path']} | "
            f"{r['batch']}×{r['length']} | {fmt(r['median_ms'])} | {tp} | {fmt(r['peak_mem_mb'], 1)} | "
            f"{fmt(r['time_ratio'])} | {fmt(r['mem_ratio'])} |" + (f" {r['note']}" if r["note"] else "")
        )
    return head + "\n".join(lines) + "\n"


def environment() -> str:
    import fairseq

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {dev}, {torch.get_num_threads()} CPU threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}, fairseq {fairseq.__version__}")


def write_plot(rows: List[dict], path: str) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq turns DEBUG on
    import matplotlib.pyplot as plt

    levels = [lv for lv in LEVELS if any(r["level"] == lv for r in rows)]
    fig, axes = plt.subplots(len(levels), 1, figsize=(9, 0.22 * len(rows) + 1.6 * len(levels)), squeeze=False)
    # the targets: core <= 1.3x one SDPA call (stretch), words/s >= 0.9x stock, beam <= 1.15x
    targets = {"core": 1.3, "train": 1 / 0.9, "beam": 1.15}
    for ax, level in zip(axes[:, 0], levels):
        sel = [r for r in rows if r["level"] == level]
        labels = [f"{r['shape']} {r['dtype']} {r['variant']}/{r['path']}" for r in sel]
        values = [r["time_ratio"] if r["time_ratio"] == r["time_ratio"] else 0.0 for r in sel]
        colors = ["grey" if r["variant"] in ("stock", "sdpa") else "tab:blue" if r["variant"] == "softmax"
                  else "tab:red" if r["variant"] == "dagpam" else "tab:green" for r in sel]
        ax.barh(range(len(sel)), values, color=colors)
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        if level in targets:
            ax.axvline(targets[level], color="tab:orange", lw=0.8, ls="--", label=f"target {targets[level]:.2f}×")
            ax.legend(fontsize=7, loc="lower right")
        base = "one SDPA call" if level == "core" else "stock fairseq"
        ax.set_xlabel(f"time relative to {base} (lower is faster)")
        ax.set_title(f"{level} ({sel[0]['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: all three on cuda, fp32 on cpu)")
    p.add_argument("--levels", default=",".join(LEVELS), help=f"comma list of {','.join(LEVELS)}")
    p.add_argument("--shapes", default=None, help="comma list of iwslt,wmt_big,lm512,lm3072 (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 10, beam level 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; --quick 1)")
    p.add_argument("--batch-scale", type=float, default=1.0,
                   help="multiply every batch size (and the beam level's sentences) by this, e.g. 0.125 on a CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; --quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke run of every row in seconds")
    p.add_argument("--out-dir", default=os.path.join(REPO, "runs", "benchmark"), help="where the CSV, Markdown and PNG go")
    return p.parse_args(argv)


def main(argv=None) -> List[dict]:
    threads_before = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads_before)  # main() also runs inside the tests' process
        _MODEL_CACHE.clear()


def run(argv=None) -> List[dict]:
    args = parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device_name = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmark: --device cuda, but torch sees no CUDA device (torch "
                 f"{torch.__version__}); run on a GPU machine or pass --device cpu")
    device = torch.device(device_name)
    dtype_names = (args.dtypes or ("fp32,fp16,bf16" if device.type == "cuda" else "fp32")).split(",")
    for d in dtype_names:
        if d not in DTYPES:
            sys.exit(f"benchmark: --dtypes: unknown {d!r}; choose from {', '.join(DTYPES)}")
    levels = args.levels.split(",")
    for lv in levels:
        if lv not in LEVELS:
            sys.exit(f"benchmark: --levels: unknown {lv!r}; choose from {', '.join(LEVELS)}")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = set(wanted) - {s.name for s in shapes}
        if unknown:
            sys.exit(f"benchmark: --shapes: unknown {sorted(unknown)}; choose from {', '.join(s.name for s in shapes)}")
        shapes = tuple(s for s in shapes if s.name in wanted)
    if not args.batch_scale > 0:
        sys.exit(f"benchmark: --batch-scale: must be > 0, got {args.batch_scale}")
    if args.batch_scale != 1.0:
        scaled = lambda n: max(1, round(n * args.batch_scale)) if n else 0
        shapes = tuple(dataclasses.replace(s, batch=scaled(s.batch), beam_sentences=scaled(s.beam_sentences))
                       for s in shapes)
    repeats = args.repeats or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    os.makedirs(args.out_dir, exist_ok=True)
    log(f"{environment()}; device {device}, dtypes {dtype_names}, levels {levels}, "
        f"mechanisms {mechanism_names()}, {repeats} timed calls per row, {warmup} warm-up")

    builders = {"core": core_variants, "attention": attention_variants, "train": train_variants, "beam": beam_variants}
    # canonical order: a model used by the beam level cannot train any more (fairseq's
    # make_generation_fast_), so the train level always runs first
    levels = [lv for lv in LEVELS if lv in levels]
    groups = [(lv, s, d) for lv in levels for s in shapes for d in dtype_names
              if not (lv == "beam" and not s.beam_sentences)]
    rows: List[dict] = []
    start = time.time()
    for n, (level, shape, dname) in enumerate(groups, 1):
        log(f"group {n}/{len(groups)}: {level} {shape.name} {dname} ({time.time() - start:.0f} s so far)")
        # a beam-search call lasts seconds: fewer of them unless --repeats was given
        reps, warm = (min(repeats, 3), min(warmup, 1)) if level == "beam" and args.repeats is None else (repeats, warmup)
        group = run_group(level, shape, dname, device, builders[level](shape, DTYPES[dname], device), warm, reps)
        r0 = f"{group[0]['variant']}/{group[0]['path']}"  # the group's baseline
        for r in group:
            log(f"  {r['variant']:>14}/{r['path']:<8} {fmt(r['median_ms']):>10} ms  ×{fmt(r['time_ratio'])} {r0}"
                + (f"  {fmt(r['peak_mem_mb'], 1)} MiB ×{fmt(r['mem_ratio'])}" if device.type == "cuda" else ""))
        rows += group
        write_csv(rows, os.path.join(args.out_dir, "benchmark.csv"))  # partial results survive a time limit
        park_models()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    csv_path = os.path.join(args.out_dir, "benchmark.csv")
    md_path = os.path.join(args.out_dir, "benchmark.md")
    png_path = os.path.join(args.out_dir, "benchmark.png")
    write_csv(rows, csv_path)
    with open(md_path, "w") as f:
        f.write(f"Command: `python scripts/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                f"{environment()}\n\n{markdown_table(rows)}")
    write_plot(rows, png_path)
    log(f"done in {time.time() - start:.0f} s: {csv_path}, {md_path}, {png_path}")
    return rows


if __name__ == "__main__":
    main()
