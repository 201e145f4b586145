"""The ``ops`` level: kernels launched and bytes kept for the backward pass, next to stock fairseq.

Deterministic, on any device, seconds on a CPU: the kernels one forward + backward pass
launches, as a GPU launches them, and the bytes autograd keeps for the backward pass
(:mod:`gpam_fairseq.measurement.profiling`). Rows: one attention module per role (encoder
self-attention with padding; decoder self-attention, causal, without and with target
padding; cross attention with padding; one incremental beam step of decoder self and of
cross attention, forward only), and one whole training step (forward, loss, backward) of
each pair (``iwslt``, ``wmt_big``, ``lm512``) at its real size and dictionary. Every row
has stock fairseq and each ``--attention-type``, daGPAM twice (keeping and recomputing its
attention for the backward pass); the ratios are to the group's stock row.
"""

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from gpam_fairseq.measurement.benchmark.inputs import (
    BEAM, FULL_SHAPES, RECOMPUTED, Shape, build_model, future_mask, left_padding, model_arms, padded_lengths,
    training_loss)
from gpam_fairseq.measurement.benchmark.report import fmt, log

# The ops level: modules at the issue-sized shape below; whole steps of the three pairs at
# their real architecture and dictionary, on a batch small enough for a CPU (counts do not
# depend on the batch; saved bytes scale with it, their ratio hardly).
OPS_MODULE = dict(batch=16, length=32, source=24, embed_dim=512, heads=4, dropout=0.1, beam=BEAM, prefix=8)
OPS_STEP_BATCH = {"iwslt": (16, 32), "wmt_big": (16, 32), "lm512": (2, 64)}
OPS_PAIRS = ("iwslt", "wmt_big", "lm512")
ROLES = ("enc_self", "dec_self", "dec_self_pad", "cross", "beam_self", "beam_cross")


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
