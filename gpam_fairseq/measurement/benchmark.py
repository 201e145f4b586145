"""Kernels, saved bytes, speed and memory of every attention we ship, next to stock fairseq.

Five levels, each a function of its inputs (``--levels``, any subset, in this order):

* ``ops`` (deterministic, any device, seconds on a CPU): the kernels one forward + backward
  pass launches, as a GPU launches them, and the bytes autograd keeps for the backward pass
  (:mod:`gpam_fairseq.measurement.profiling`). Rows: one attention module per role (encoder
  self-attention with padding; decoder self-attention, causal, without and with target
  padding; cross attention with padding; one incremental beam step of decoder self and of
  cross attention, forward only), and one whole training step (forward, loss, backward) of
  each pair (``iwslt``, ``wmt_big``, ``lm512``) at its real size and dictionary. Every row
  has stock fairseq and each ``--attention-type``. Written to ``ops.csv``.
* ``core``: the attention core alone, forward + backward, on per-head (B, H, T, d_h) tensors:
  one ``scaled_dot_product_attention`` call against each mechanism's fused and explicit path.
* ``attention``: one attention module, forward + backward, at the shapes of the paper's
  setups (``iwslt``: ~4096 tokens, d=512, 4 heads, encoder self-attention with padding;
  ``wmt_big``: ~3584 tokens, d=1024, 16 heads, same; ``lm512`` / ``lm3072``: d=1024,
  8 heads, causal decoder self-attention). Stock ``fairseq.modules.MultiheadAttention`` (its
  fast path, and with ``need_weights=True``), then every mechanism, fused and explicit.
* ``train``: one training step (forward, cross-entropy, backward, Adam step) of
  ``transformer_iwslt_de_en`` / ``transformer_vaswani_wmt_en_de_big`` / ``transformer_lm``
  (stock) against our ``transformer_gpam_*`` / ``transformer_lm_gpam`` with each type.
* ``beam``: beam search (beam 5) through fairseq's ``SequenceGenerator`` for the NMT pairs,
  every hypothesis forced to the same length so that all rows do the same work.

Timed rows report the median wall time over ``--repeats`` calls (the variants of one group
interleaved round by round, so that background load hits them alike), the peak memory
(CUDA's ``max_memory_allocated`` during one call, minus what was allocated before it; ``n/a``
on a CPU, where no honest per-call figure exists) and the ratio to the group's stock row.

    python scripts/benchmark.py --levels ops                      # the deterministic table (CPU)
    python scripts/benchmark.py --device cuda --levels core,attention,train,beam --dtypes bf16
    python scripts/benchmark.py --quick                           # tiny CPU smoke run (the tests)

Writes ``ops.csv`` / ``benchmark.csv``, ``benchmark.md`` and ``benchmark.png`` into ``--out-dir``.
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
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from gpam_fairseq.fairseq_glue.tools import IWSLT_DE, IWSLT_EN, WIKI103, WMT_JOINED, REPO_ROOT
from gpam_fairseq.fairseq_glue.tools import build_language_model, build_translation_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LEVELS = ("ops", "core", "attention", "train", "beam")
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
    # whole-model levels: stock architecture, ours, dictionary size, extra architecture flags
    stock_arch: str
    gpam_arch: str
    vocab: int
    arch_flags: tuple = ()
    beam_sentences: int = 0  # 0: no beam-search level (language models)
    beam_length: int = 0
    joined: bool = False  # one dictionary for both languages (WMT)

    @property
    def is_lm(self) -> bool:
        return self.beam_sentences == 0


# Real sizes: the paper's setups, with the dictionaries fairseq's recipes produce.
FULL_SHAPES = (
    Shape("iwslt", 128, 32, 512, 4, False, "transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en",
          IWSLT_DE, ("--share-decoder-input-output-embed",), beam_sentences=128, beam_length=32),
    Shape("wmt_big", 112, 32, 1024, 16, False, "transformer_vaswani_wmt_en_de_big",
          "transformer_gpam_vaswani_wmt_en_de_big", WMT_JOINED, ("--share-all-embeddings",),
          beam_sentences=128, beam_length=32, joined=True),
    Shape("lm512", 4, 512, 1024, 8, True, "transformer_lm", "transformer_lm_gpam", WIKI103,
          ("--share-decoder-input-output-embed",)),
    Shape("lm3072", 1, 3072, 1024, 8, True, "transformer_lm", "transformer_lm_gpam", WIKI103,
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
          beam_sentences=3, beam_length=5, joined=True),
    Shape("lm512", 2, 16, 64, 8, True, "transformer_lm", "transformer_lm_gpam", 60,
          ("--share-decoder-input-output-embed",) + _TINY_LM),
    Shape("lm3072", 1, 48, 64, 8, True, "transformer_lm", "transformer_lm_gpam", 60,
          ("--share-decoder-input-output-embed",) + _TINY_LM),
)

# The ops level: modules at the issue-sized shape below; whole steps of the three pairs at
# their real architecture and dictionary, on a batch small enough for a CPU (counts do not
# depend on the batch; saved bytes scale with it, their ratio hardly).
OPS_MODULE = dict(batch=16, length=32, source=24, embed_dim=512, heads=4, dropout=0.1, beam=BEAM, prefix=8)
OPS_STEP_BATCH = {"iwslt": (16, 32), "wmt_big": (16, 32), "lm512": (2, 64)}
OPS_PAIRS = ("iwslt", "wmt_big", "lm512")
ROLES = ("enc_self", "dec_self", "dec_self_pad", "cross", "beam_self", "beam_cross")

FIELDS = ("level", "shape", "device", "dtype", "variant", "path", "batch", "length", "embed_dim",
          "heads", "causal", "median_ms", "throughput", "throughput_unit", "peak_mem_mb",
          "time_ratio", "mem_ratio", "note")
OPS_FIELDS = ("level", "shape", "variant", "path", "kernels_forward", "kernels_backward", "kernels",
              "kernel_ratio", "host_syncs", "saved_mib", "saved_ratio", "note")


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


def left_padding(batch: int, length: int, gen: torch.Generator, device) -> torch.Tensor:
    """fairseq's source-side padding mask (True = pad, on the left) for random lengths."""
    return (torch.arange(length).unsqueeze(0) < (length - padded_lengths(batch, length, gen)).unsqueeze(1)).to(device)


def future_mask(t: int, dtype: torch.dtype, device) -> torch.Tensor:
    """fairseq's decoder mask: float -inf above the diagonal, recorded as such by our
    decoder (which the module needs to take the fused kernel's causal path)."""
    from gpam_fairseq.attention.multihead import mark_causal

    return mark_causal(torch.triu(torch.full((t, t), float("-inf"), dtype=dtype, device=device), 1))


def build_model(shape: Shape, arch: str, extra: Sequence[str] = ()):
    """(model, dictionary) as fairseq-train builds it, with a dictionary of the real size."""
    flags = [*shape.arch_flags, *extra]
    if shape.is_lm:
        model = build_language_model(arch, ["--tokens-per-sample", str(shape.length), *flags], vocab=shape.vocab)
        return model, model.decoder.dictionary
    model = build_translation_model(arch, flags, src_size=shape.vocab, tgt_size=shape.vocab, joined=shape.joined)
    return model, model.decoder.dictionary


# The ops level measures daGPAM both ways: keeping its fused attention's tensors for the
# backward pass, and recomputing them there (--gpam-recompute-attention).
RECOMPUTED = "dagpam-recompute"


def variant_flags(variant: str) -> tuple:
    """The flags of a variant of the ops level: an attention type, or daGPAM recomputed."""
    if variant == RECOMPUTED:
        return ("--attention-type", "dagpam", "--gpam-recompute-attention")
    return ("--attention-type", variant)


def model_arms(shape: Shape, types: Sequence[str]) -> List[Tuple[str, str, tuple]]:
    """(variant name, architecture, extra flags): stock first, then each attention type."""
    return [("stock", shape.stock_arch, ())] + [(n, shape.gpam_arch, variant_flags(n)) for n in types]


def nmt_batch(batch: int, length: int, dictionary, device, gen: torch.Generator):
    """Left-padded sources, right-padded targets (fairseq's defaults) of random tokens."""
    pad, eos, low = dictionary.pad(), dictionary.eos(), dictionary.nspecial
    src_len, tgt_len = padded_lengths(batch, length, gen), padded_lengths(batch, length, gen)
    src = torch.full((batch, length), pad, dtype=torch.long)
    tgt = torch.full((batch, length), pad, dtype=torch.long)
    prev = torch.full((batch, length), pad, dtype=torch.long)
    for i in range(batch):
        s, t = int(src_len[i]), int(tgt_len[i])
        src[i, length - s:] = torch.randint(low, len(dictionary), (s,), generator=gen)
        src[i, -1] = eos
        tgt[i, :t] = torch.randint(low, len(dictionary), (t,), generator=gen)
        tgt[i, t - 1] = eos
        prev[i, 0] = eos
        prev[i, 1:t] = tgt[i, : t - 1]
    return src.to(device), src_len.to(device), prev.to(device), tgt.to(device)


def training_loss(model, shape: Shape, batch: int, length: int, dictionary, device, gen):
    """(loss function of the model, words per call) for one batch of random tokens."""
    pad = dictionary.pad()
    if shape.is_lm:
        tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch, length + 1), generator=gen).to(device)
        src, tgt = tokens[:, :-1], tokens[:, 1:]
        forward = lambda: model(src)[0]
    else:
        src, src_len, prev, tgt = nmt_batch(batch, length, dictionary, device, gen)
        forward = lambda: model(src, src_len, prev)[0]

    def loss():
        logits = forward()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt.reshape(-1), ignore_index=pad)

    return loss, float(tgt.ne(pad).sum())


# ----------------------------------------------------------------------------- ops level


def attention_module(variant: str, role: str, embed_dim: int, heads: int, dropout: float):
    """Stock fairseq MultiheadAttention or ours with the given type, for one role."""
    from fairseq.modules import MultiheadAttention

    from gpam_fairseq.modules.transformer import build_attention
    from gpam_fairseq.options import GPAMOptions

    cross = role in ("cross", "beam_cross")
    kwargs = dict(encoder_decoder_attention=True, kdim=embed_dim, vdim=embed_dim) if cross else dict(self_attention=True)
    if variant == "stock":
        return MultiheadAttention(embed_dim, heads, dropout=dropout, **kwargs)
    ours = {"enc_self": "enc_self", "cross": "cross", "beam_cross": "cross"}.get(role, "dec_self")
    options = GPAMOptions(attention_type="dagpam", recompute_attention=True) if variant == RECOMPUTED else (
        GPAMOptions(attention_type=variant))
    return build_attention(ours, options, embed_dim, heads, dropout=dropout, **kwargs)


def module_pass(variant: str, role: str, device) -> Tuple[Callable[[], torch.Tensor], torch.nn.Module, bool, list]:
    """(forward returning the output, module, whether to run a backward pass, the input
    leaves that get a gradient) of one role.

    Training roles run as fairseq's layers call them (training mode, attention dropout);
    beam roles run one incremental step after ``prefix`` steps have filled the cache, with
    fairseq-generate's beamable cross attention, in evaluation mode under no_grad."""
    c = OPS_MODULE
    B, T, S, E, H = c["batch"], c["length"], c["source"], c["embed_dim"], c["heads"]
    gen = torch.Generator().manual_seed(0)
    module = attention_module(variant, role, E, H, c["dropout"]).to(device)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)
    if role.startswith("beam"):
        module.eval()
        n, beam, steps = B // 4, c["beam"], c["prefix"]
        hyps = n * beam
        memory = rand(S, n, E).repeat_interleave(beam, dim=1)  # what the generator gives: one copy per hypothesis
        src_pad = left_padding(n, S, gen, device).repeat_interleave(beam, dim=0)
        state: Dict = {}
        if role == "beam_cross":
            module.set_beam_size(beam)
            step = lambda x, first: module(x, memory if first else None, memory if first else None,
                                           key_padding_mask=src_pad, incremental_state=state, static_kv=True,
                                           need_weights=False)[0]
        else:
            step = lambda x, first: module(x, x, x, incremental_state=state, need_weights=False)[0]
        with torch.no_grad():
            for t in range(steps):
                step(rand(1, hyps, E), t == 0)
        x = rand(1, hyps, E)
        return (lambda: step(x, False)), module, False, []
    module.train()
    x = rand(T, B, E).requires_grad_(True)
    if role == "cross":
        memory = rand(S, B, E).requires_grad_(True)
        pad = left_padding(B, S, gen, device)
        return (lambda: module(x, memory, memory, key_padding_mask=pad, static_kv=True, need_weights=False)[0]), module, True, [x, memory]
    if role == "enc_self":  # left padding, as fairseq's source side
        pad = left_padding(B, T, gen, device)
        return (lambda: module(x, x, x, key_padding_mask=pad, need_weights=False)[0]), module, True, [x]
    lengths = padded_lengths(B, T, gen)
    mask = future_mask(T, x.dtype, device)
    pad = (torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)).to(device) if role == "dec_self_pad" else None
    return (lambda: module(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=False)[0]), module, True, [x]


def count_row(shape: str, variant: str, path: str, run) -> dict:
    """Count one pass; ``run()`` returns (forward, parameters (excluded from the saved bytes),
    whether to run a backward pass, input leaves that get a gradient)."""
    from gpam_fairseq.attention.multihead import clear_mask_cache
    from gpam_fairseq.measurement.profiling import count_pass

    note = ""
    try:
        forward, params, backward, leaves = run()
        # one pass first: what is made once per process (constants on the device) is not a
        # cost of the pass; then every row pays for its masks, as the first layer of a stack does
        with torch.set_grad_enabled(backward):
            out = forward()
            if backward:
                out.float().sum().backward()
        for leaf in params + leaves:  # fairseq's zero_grad sets None: no gradient to add to
            leaf.grad = None
        clear_mask_cache()
        counter = count_pass(forward, exclude=params, backward=backward)
        counts = (counter.kernels_forward, counter.kernels_backward, counter.kernels, counter.host_syncs,
                  counter.saved_bytes / 2**20 if backward else float("nan"))
    except Exception as exc:  # one broken variant must not hide the others
        note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        counts = (0, 0, 0, 0, float("nan"))
    fwd, bwd, total, syncs, saved = counts
    return dict(level="ops", shape=shape, variant=variant, path=path, kernels_forward=fwd, kernels_backward=bwd,
                kernels=total, host_syncs=syncs, saved_mib=saved, note=note)


def with_ratios(group: List[dict]) -> List[dict]:
    """Ratios of kernels and saved bytes to the group's stock row."""
    stock = group[0]
    for r in group:
        r["kernel_ratio"] = r["kernels"] / stock["kernels"] if stock["kernels"] and r["kernels"] else float("nan")
        r["saved_ratio"] = (r["saved_mib"] / stock["saved_mib"]
                            if stock["saved_mib"] == stock["saved_mib"] and stock["saved_mib"] > 0 else float("nan"))
    return group


def ops_level(pairs: Sequence[Shape], device, types: Sequence[str]) -> List[dict]:
    """The ops rows: every role's module, then every pair's whole training step; daGPAM twice,
    keeping and recomputing its attention for the backward pass."""
    variants = [v for t in types for v in ((t, RECOMPUTED) if t == "dagpam" else (t,))]
    rows: List[dict] = []
    for role in ROLES:
        path = "beam step" if role.startswith("beam") else "module"

        def run(variant=None, role=role):
            forward, module, backward, leaves = module_pass(variant, role, device)
            return forward, list(module.parameters()), backward, leaves

        group = [count_row(role, v, path, lambda v=v: run(v)) for v in ("stock", *variants)]
        rows += with_ratios(group)
        log_ops(group)
    for shape in pairs:
        batch, length = OPS_STEP_BATCH[shape.name] if shape in FULL_SHAPES else (shape.batch, shape.length)
        group = []
        for variant, arch, extra in model_arms(shape, variants):

            def run(arch=arch, extra=extra):
                model, dictionary = build_model(shape, arch, extra)
                model = model.to(device).train()
                loss, _ = training_loss(model, shape, batch, length, dictionary, device, torch.Generator().manual_seed(1))
                return loss, list(model.parameters()), True, []

            group.append(count_row(shape.name, variant, "train step", run))
        rows += with_ratios(group)
        log_ops(group)
    return rows


def log_ops(group: List[dict]) -> None:
    for r in group:
        saved = f"{fmt(r['saved_mib'])} MiB ×{fmt(r['saved_ratio'])}" if r["saved_mib"] == r["saved_mib"] else ""
        log(f"  ops {r['shape']:>12}/{r['path']:<10} {r['variant']:>13}: {r['kernels_forward']:5d} + "
            f"{r['kernels_backward']:5d} = {r['kernels']:5d} kernels ×{fmt(r['kernel_ratio'])}  {saved}"
            + (f"  {r['note']}" if r["note"] else ""))


# ----------------------------------------------------------------------------- timed levels


@dataclass
class Variant:
    """A row of a timed group: ``setup()`` builds it and returns (the callable to time, the
    work one call does, for the throughput column)."""

    name: str
    path: str
    setup: Callable[[], Tuple[Callable[[], None], float]]
    unit: str = ""


def core_variants(shape: Shape, dtype: torch.dtype, device, types: Sequence[str]) -> List[Variant]:
    from gpam_fairseq.attention.masks import Mask
    from gpam_fairseq.attention.mechanisms import build_mechanism
    from gpam_fairseq.options import GPAMOptions

    gen = torch.Generator().manual_seed(0)
    B, T, heads = shape.batch, shape.length, shape.heads
    d_h = shape.embed_dim // heads
    q, k, v = (torch.randn(B, heads, T, d_h, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
               for _ in range(3))
    if shape.causal:  # as our decoder hands it over: the causal mask with no tensor
        bias, mask, causal = None, Mask(causal=True), True
    else:
        lengths = padded_lengths(B, T, gen)
        pad = torch.arange(T).unsqueeze(0) < (T - lengths).unsqueeze(1)
        bias = torch.zeros(B, 1, 1, T).masked_fill(pad.view(B, 1, 1, T), float("-inf")).to(device=device, dtype=dtype)
        mask, causal = Mask(bias), False
    tokens = float(B * T)

    def backward(out):
        for t in (q, k, v):
            t.grad = None
        out.float().sum().backward()

    def sdpa():
        return (lambda: backward(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal))), tokens

    def setup_for(name, need_weights):
        def setup():
            mechanism = build_mechanism(name, heads, d_h, GPAMOptions(attention_type=name)).to(device=device, dtype=dtype)
            return (lambda: backward(mechanism(q, k, v, mask, 0.0, need_weights)[0])), tokens

        return setup

    variants = [Variant("sdpa", "one call", sdpa, "tokens/s")]
    for name in types:
        variants.append(Variant(name, "fused", setup_for(name, False), "tokens/s"))
        variants.append(Variant(name, "explicit", setup_for(name, True), "tokens/s"))
    return variants


def attention_variants(shape: Shape, dtype: torch.dtype, device, types: Sequence[str]) -> List[Variant]:
    from fairseq.modules import MultiheadAttention

    from gpam_fairseq.modules.transformer import build_attention
    from gpam_fairseq.options import GPAMOptions

    gen = torch.Generator().manual_seed(0)
    B, T, E = shape.batch, shape.length, shape.embed_dim
    x = torch.randn(T, B, E, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    if shape.causal:
        kpm, attn_mask = None, future_mask(T, dtype, device)
    else:  # encoder self-attention over a left-padded batch, as fairseq's source side
        lengths = padded_lengths(B, T, gen)
        kpm = (torch.arange(T).unsqueeze(0) < (T - lengths).unsqueeze(1)).to(device)
        attn_mask = None
    tokens = float(B * T)

    def setup_for(make_module, need_weights: bool):
        def setup():
            module = make_module().to(device=device, dtype=dtype).train()

            def step():
                x.grad = None
                module.zero_grad(set_to_none=True)
                out, _ = module(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights)
                out.float().sum().backward()

            return step, tokens

        return setup

    role = "dec_self" if shape.causal else "enc_self"
    stock = lambda: MultiheadAttention(E, shape.heads, self_attention=True)
    variants = [Variant("stock", "fast", setup_for(stock, False), "tokens/s"),
                Variant("stock", "weights", setup_for(stock, True), "tokens/s")]
    for name in types:
        make = lambda name=name: build_attention(role, GPAMOptions(attention_type=name), E, shape.heads, self_attention=True)
        variants.append(Variant(name, "fused", setup_for(make, False), "tokens/s"))
        variants.append(Variant(name, "explicit", setup_for(make, True), "tokens/s"))
    return variants


def train_variants(shape: Shape, dtype: torch.dtype, device, types: Sequence[str]) -> List[Variant]:
    def setup_for(arch, extra):
        def setup():
            model, dictionary = build_model(shape, arch, extra)
            model = model.to(device=device, dtype=dtype).train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-4)
            loss, words = training_loss(model, shape, shape.batch, shape.length, dictionary, device,
                                        torch.Generator().manual_seed(1))

            def step():
                opt.zero_grad(set_to_none=True)
                loss().backward()
                opt.step()

            return step, words

        return setup

    return [Variant(name, "train", setup_for(arch, extra), "words/s") for name, arch, extra in model_arms(shape, types)]


def beam_variants(shape: Shape, dtype: torch.dtype, device, types: Sequence[str]) -> List[Variant]:
    from fairseq.sequence_generator import SequenceGenerator

    def setup_for(arch, extra):
        def setup():
            model, dictionary = build_model(shape, arch, extra)  # its own model: generation changes it
            model = model.to(device=device, dtype=dtype).eval()
            # what fairseq-generate does (beamable cross attention, no alignment output)
            model.make_generation_fast_(beamable_mm_beam_size=BEAM, need_attn=False)
            # every hypothesis gets exactly beam_length tokens: equal work in every row
            generator = SequenceGenerator([model], dictionary, beam_size=BEAM, max_len_a=0,
                                          max_len_b=shape.beam_length, min_len=shape.beam_length)
            src, src_len, _, _ = nmt_batch(shape.beam_sentences, shape.length, dictionary, device,
                                           torch.Generator().manual_seed(2))
            sample = {"net_input": {"src_tokens": src, "src_lengths": src_len}}

            def step():
                with torch.no_grad():
                    generator.generate([model], sample)

            return step, float(shape.beam_sentences)

        return setup

    return [Variant(name, "beam5", setup_for(arch, extra), "sentences/s") for name, arch, extra in model_arms(shape, types)]


TIMED_LEVELS = {"core": core_variants, "attention": attention_variants, "train": train_variants, "beam": beam_variants}


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_group(level: str, shape: Shape, dtype_name: str, device, variants: List[Variant],
               warmup: int, repeats: int) -> List[dict]:
    """Warm every variant up, take each one's peak memory alone, then time them round by round."""
    steps: Dict[int, Callable] = {}
    work: Dict[int, float] = {}
    notes: Dict[int, str] = {}
    for i, var in enumerate(variants):
        try:
            steps[i], work[i] = var.setup()
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
            throughput=work.get(i, 0.0) / median if work.get(i) and median == median else float("nan"),
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


def timed_level(level: str, shapes: Sequence[Shape], dtype_names: Sequence[str], device, types: Sequence[str],
                warmup: int, repeats: int, on_group: Callable[[List[dict]], None]) -> List[dict]:
    """One timed level over shapes x dtypes; ``on_group`` sees every finished group."""
    rows: List[dict] = []
    groups = [(s, d) for s in shapes for d in dtype_names if not (level == "beam" and s.is_lm)]
    for n, (shape, dname) in enumerate(groups, 1):
        log(f"{level} group {n}/{len(groups)}: {shape.name} {dname}")
        group = time_group(level, shape, dname, device, TIMED_LEVELS[level](shape, DTYPES[dname], device, types),
                           warmup, repeats)
        base = f"{group[0]['variant']}/{group[0]['path']}"
        for r in group:
            log(f"  {r['variant']:>14}/{r['path']:<8} {fmt(r['median_ms']):>10} ms  ×{fmt(r['time_ratio'])} {base}"
                + (f"  {fmt(r['peak_mem_mb'], 1)} MiB ×{fmt(r['mem_ratio'])}" if device.type == "cuda" else ""))
        rows += group
        on_group(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- output


def fmt(value, digits=2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    return str(value)


def write_csv(rows: List[dict], path: str, fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("n/a" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in fields})


def ops_table(rows: List[dict]) -> str:
    head = ("| row | path | variant | kernels fwd + bwd | × stock | host syncs | saved for backward | × stock |\n"
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        saved = f"{fmt(r['saved_mib'], 1)} MiB" if r["saved_mib"] == r["saved_mib"] else "n/a (no backward)"
        lines.append(f"| {r['shape']} | {r['path']} | {r['variant']} | {r['kernels_forward']} + {r['kernels_backward']}"
                     f" = {r['kernels']} | {fmt(r['kernel_ratio'])} | {r['host_syncs']} | {saved} | "
                     f"{fmt(r['saved_ratio'])} |" + (f" {r['note']}" if r["note"] else ""))
    return head + "\n".join(lines) + "\n"


def timing_table(rows: List[dict]) -> str:
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


def write_plot(ops_rows: List[dict], timed_rows: List[dict], path: str) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq turns DEBUG on
    import matplotlib.pyplot as plt

    panels = []
    if ops_rows:
        panels.append(("ops: kernels", [r for r in ops_rows if r["variant"] != "stock"], "kernel_ratio",
                       "kernels relative to stock fairseq", None))
        panels.append(("ops: saved for backward", [r for r in ops_rows if r["variant"] != "stock"
                                                   and r["saved_ratio"] == r["saved_ratio"]], "saved_ratio",
                       "saved bytes relative to stock fairseq", None))
    # the targets: words/s >= 0.95x stock, beam <= 1.15x
    targets = {"train": 1 / 0.95, "beam": 1.15}
    for level in LEVELS[1:]:
        sel = [r for r in timed_rows if r["level"] == level]
        if sel:
            base = "one SDPA call" if level == "core" else "stock fairseq"
            panels.append((f"{level} ({sel[0]['device']})", sel, "time_ratio",
                           f"time relative to {base} (lower is faster)", targets.get(level)))
    if not panels:
        return
    height = sum(0.2 * len(p[1]) + 1.4 for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, height), squeeze=False)
    for ax, (title, sel, key, xlabel, target) in zip(axes[:, 0], panels):
        labels = [f"{r['shape']} {r.get('dtype', '')} {r['variant']}/{r['path']}" for r in sel]
        values = [r[key] if r[key] == r[key] else 0.0 for r in sel]
        colors = ["grey" if r["variant"] in ("stock", "sdpa") else "tab:blue" if r["variant"] == "softmax"
                  else "tab:red" if r["variant"] == "dagpam" else "tab:green" for r in sel]
        ax.barh(range(len(sel)), values, color=colors)
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        if target:
            ax.axvline(target, color="tab:orange", lw=0.8, ls="--", label=f"target {target:.2f}×")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 for the timed levels "
                   "(default: all three on cuda, fp32 on cpu); the ops level counts in fp32")
    p.add_argument("--levels", default=",".join(LEVELS), help=f"comma list of {','.join(LEVELS)}")
    p.add_argument("--shapes", default=None, help="comma list of iwslt,wmt_big,lm512,lm3072 (default: all; "
                   "the ops level's training steps use iwslt, wmt_big and lm512)")
    p.add_argument("--types", default=None, help="comma list of attention types (default: every registered one)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 10, beam level 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; --quick 1)")
    p.add_argument("--batch-scale", type=float, default=1.0,
                   help="multiply every timed batch size (and the beam level's sentences) by this, e.g. 0.125 on a CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; --quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke run of every row in seconds "
                   "(the ops level's modules keep their size; its training steps use the tiny models)")
    p.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "runs", "benchmark"), help="where the CSV, Markdown and PNG go")
    return p.parse_args(argv)


def main(argv=None) -> List[dict]:
    threads_before = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads_before)  # main() also runs inside the tests' process


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
    types = mechanism_names()
    if args.types:
        unknown = set(args.types.split(",")) - set(types)
        if unknown:
            sys.exit(f"benchmark: --types: unknown {sorted(unknown)}; choose from {', '.join(types)}")
        types = [t for t in types if t in args.types.split(",")]
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    wanted = args.shapes.split(",") if args.shapes else [s.name for s in shapes]
    unknown = set(wanted) - {s.name for s in shapes}
    if unknown:
        sys.exit(f"benchmark: --shapes: unknown {sorted(unknown)}; choose from {', '.join(s.name for s in shapes)}")
    timed_shapes = tuple(s for s in shapes if s.name in wanted)
    ops_pairs = tuple(s for s in shapes if s.name in OPS_PAIRS and s.name in wanted)
    if not args.batch_scale > 0:
        sys.exit(f"benchmark: --batch-scale: must be > 0, got {args.batch_scale}")
    if args.batch_scale != 1.0:
        scaled = lambda n: max(1, round(n * args.batch_scale)) if n else 0
        timed_shapes = tuple(dataclasses.replace(s, batch=scaled(s.batch), beam_sentences=scaled(s.beam_sentences))
                             for s in timed_shapes)
    repeats = args.repeats or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    os.makedirs(args.out_dir, exist_ok=True)
    log(f"{environment()}; device {device}, dtypes {dtype_names}, levels {levels}, types {types}, "
        f"{repeats} timed calls per row, {warmup} warm-up")

    start = time.time()
    ops_rows: List[dict] = []
    timed_rows: List[dict] = []
    csv_path = os.path.join(args.out_dir, "benchmark.csv")
    ops_path = os.path.join(args.out_dir, "ops.csv")
    if "ops" in levels:
        log(f"ops: kernels and saved bytes, module per role and whole training steps ({', '.join(s.name for s in ops_pairs)})")
        ops_rows = ops_level(ops_pairs, device, types)
        write_csv(ops_rows, ops_path, OPS_FIELDS)
        print(ops_table(ops_rows), flush=True)
    for level in LEVELS[1:]:
        if level not in levels:
            continue
        # a beam-search call lasts seconds: fewer of them unless --repeats was given
        reps, warm = (min(repeats, 3), min(warmup, 1)) if level == "beam" and args.repeats is None else (repeats, warmup)
        done = list(timed_rows)
        timed_rows = done + timed_level(level, timed_shapes, dtype_names, device, types, warm, reps,
                                        # partial results survive a time limit
                                        lambda rows: write_csv(done + rows, csv_path, FIELDS))
    if timed_rows:
        write_csv(timed_rows, csv_path, FIELDS)
    md_path = os.path.join(args.out_dir, "benchmark.md")
    png_path = os.path.join(args.out_dir, "benchmark.png")
    with open(md_path, "w") as f:
        f.write(f"Command: `python scripts/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                f"{environment()}\n\n")
        if ops_rows:
            f.write("Kernels launched by one forward + backward pass (a fused attention call counts one each "
                    "way) and bytes kept for the backward pass; deterministic.\n\n" + ops_table(ops_rows) + "\n")
        if timed_rows:
            f.write(timing_table(timed_rows))
    write_plot(ops_rows, timed_rows, png_path)
    log(f"done in {time.time() - start:.0f} s: {md_path}, {png_path}"
        + (f", {ops_path}" if ops_rows else "") + (f", {csv_path}" if timed_rows else ""))
    return ops_rows + timed_rows


if __name__ == "__main__":
    main()
