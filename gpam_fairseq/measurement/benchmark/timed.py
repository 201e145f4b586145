"""The timed levels of the benchmark: ``core``, ``attention``, ``train`` and ``beam``.

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

Each row reports the median wall time over the timed calls (the variants of one group
interleaved round by round, so that background load hits them alike), the peak memory
(CUDA's ``max_memory_allocated`` during one call, minus what was allocated before it; ``n/a``
on a CPU, where no honest per-call figure exists) and the ratio to the group's stock row.
"""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from gpam_fairseq.measurement.benchmark.inputs import (
    BEAM, DTYPES, Shape, build_model, future_mask, model_arms, nmt_batch, padded_lengths, training_loss)
from gpam_fairseq.measurement.benchmark.report import fmt, log


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
