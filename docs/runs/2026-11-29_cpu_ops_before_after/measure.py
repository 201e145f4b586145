"""Kernels and saved bytes of one checkout of gpam_fairseq, counted by counter.py (a standalone copy
of gpam_fairseq/profiling.py, so that checkouts older than it can be measured) on the inputs of
scripts/benchmark.py --levels ops. Run (see README.md here):

    PYTHONPATH=CHECKOUT:CHECKOUT/tests:THIS_FOLDER python THIS_FOLDER/measure.py
"""
import json

import torch
from counter import count_pass
from fairseq.modules import MultiheadAttention
from gpam_fairseq.modules.transformer import build_attention
from gpam_fairseq.options import GPAMOptions
from helpers import build_translation_model, build_language_model
B,T,S,E,H,P = 16,32,24,512,4,0.1
def lens(n, t, g):
    l = torch.randint(max(1,t//2), t+1, (n,), generator=g); l[0] = t; return l
def module(kind, role):
    kw = dict(encoder_decoder_attention=True, kdim=E, vdim=E) if role=='cross' else dict(self_attention=True)
    if kind=='stock': return MultiheadAttention(E,H,dropout=P,**kw)
    return build_attention('cross' if role=='cross' else ('enc_self' if role=='enc_self' else 'dec_self'), GPAMOptions(attention_type=kind), E, H, dropout=P, **kw)
def mask_fut():
    m = torch.triu(torch.full((T,T), float('-inf')), 1)
    try:
        from gpam_fairseq.attention.multihead import mark_causal
        m = mark_causal(m)
    except ImportError:
        pass
    return m
def clear():
    try:
        from gpam_fairseq.attention.multihead import clear_mask_cache; clear_mask_cache()
    except ImportError: pass
out = {}
for role in ('enc_self','dec_self','dec_self_pad','cross'):
    for kind in ('stock','softmax','dagpam'):
        g = torch.Generator().manual_seed(0)
        m = module(kind, role).train()
        x = torch.randn(T,B,E,generator=g).requires_grad_(True)
        if role=='cross':
            mem = torch.randn(S,B,E,generator=g).requires_grad_(True)
            pad = torch.arange(S)[None] < (S-lens(B,S,g))[:,None]
            f = lambda: m(x, mem, mem, key_padding_mask=pad, static_kv=True, need_weights=False)[0]
        elif role=='enc_self':
            pad = torch.arange(T)[None] < (T-lens(B,T,g))[:,None]
            f = lambda: m(x,x,x,key_padding_mask=pad,need_weights=False)[0]
        else:
            l = lens(B,T,g); fut = mask_fut()
            pad = (torch.arange(T)[None] >= l[:,None]) if role=='dec_self_pad' else None
            f = lambda: m(x,x,x,key_padding_mask=pad,attn_mask=fut,need_weights=False)[0]
        clear()
        c = count_pass(f, exclude=list(m.parameters()))
        out[(role,kind)] = (c.kernels, c.saved_bytes/2**20)
for pair in ('iwslt','lm512'):
    for kind in ('stock','softmax','dagpam'):
        g = torch.Generator().manual_seed(1)
        if pair=='iwslt':
            arch = 'transformer_iwslt_de_en' if kind=='stock' else 'transformer_gpam_iwslt_de_en'
            extra = ['--share-decoder-input-output-embed'] + ([] if kind=='stock' else ['--attention-type', kind])
            model = build_translation_model(arch, extra, src_size=8848, tgt_size=8848).train()
            d = model.decoder.dictionary
            src = torch.randint(4, 8848, (B,T), generator=g); sl = lens(B,T,g)
            for i in range(B): src[i,:T-sl[i]] = 1
            tl = lens(B,T,g); prev = torch.randint(4,8848,(B,T),generator=g); tgt = torch.randint(4,8848,(B,T),generator=g)
            for i in range(B): prev[i,tl[i]:]=1; tgt[i,tl[i]:]=1
            f = lambda: torch.nn.functional.cross_entropy(model(src, sl, prev)[0].reshape(-1, len(d)).float(), tgt.reshape(-1), ignore_index=1)
        else:
            arch = 'transformer_lm' if kind=='stock' else 'transformer_lm_gpam'
            extra = ['--share-decoder-input-output-embed','--tokens-per-sample','64'] + ([] if kind=='stock' else ['--attention-type', kind])
            model = build_language_model(arch, extra, vocab=267744).train()
            toks = torch.randint(4, 267744, (2, 65), generator=g)
            f = lambda: torch.nn.functional.cross_entropy(model(toks[:, :-1])[0].reshape(-1, 267744).float(), toks[:, 1:].reshape(-1))
        clear()
        c = count_pass(f, exclude=list(model.parameters()))
        out[(pair,kind)] = (c.kernels, c.saved_bytes/2**20)
print(json.dumps({f"{a}|{b}": v for (a,b), v in out.items()}))
