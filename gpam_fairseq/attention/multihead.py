"""A drop-in for ``fairseq.modules.MultiheadAttention`` whose core is a pluggable mechanism.

It keeps the stock module's parameters (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``,
``bias_k``/``bias_v``), its incremental-state layout (``prev_key``, ``prev_value``,
``prev_key_padding_mask``, batch first) and therefore the stock ``reorder_incremental_state``
for beam search, and its ``forward`` signature and return shapes. What changes is the
middle: masks become one additive bias, and the mechanism (softmax or daGPAM, see
:mod:`gpam_fairseq.attention.mechanisms`) computes the heads.

``forward`` is overridden completely: the stock one jumps to
``F.multi_head_attention_forward`` for self-attention without a cache, which would
silently bypass the mechanism during training.
"""

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from gpam_fairseq.attention.fused import KeptAliveCache, recomputed_instead_of_saved, tensor_identity
from gpam_fairseq.attention.masks import Mask

# An observer sees every call's per-head queries and keys and its mask (attention/stats.py).
Observer = Callable[[nn.Module, Tensor, Tensor, Mask], None]


# ----------------------------------------------------------------------------- masks
#
# fairseq hands every layer of a stack the same mask tensors (the encoder's padding mask,
# the decoder's future mask), and the stock module turns them into an additive mask in
# every layer. Here the Mask is built once per set of mask tensors and shared by the
# layers (with what is derived from it), and fairseq's future mask is recognised, so that
# the kernel takes its causal path with no mask tensor at all.

_CAUSAL_STORAGES: "OrderedDict[int, Tensor]" = OrderedDict()


def mark_causal(future_mask: Tensor) -> Tensor:
    """Record that ``future_mask`` is fairseq's square future mask (-inf above the diagonal).

    Called by our decoder's ``buffered_future_mask``. The record is the mask's storage (kept
    alive here, so that its address cannot be reused): fairseq slices the mask per length
    and activation checkpointing detaches it, but those views share the storage.
    """
    ptr = future_mask.untyped_storage().data_ptr()
    _CAUSAL_STORAGES[ptr] = future_mask
    _CAUSAL_STORAGES.move_to_end(ptr)
    while len(_CAUSAL_STORAGES) > 8:
        _CAUSAL_STORAGES.popitem(last=False)
    return future_mask


def is_causal_mask(attn_mask: Optional[Tensor], tgt_len: int, src_len: int) -> bool:
    """True for a square top-left slice of a mask recorded by :func:`mark_causal`."""
    if attn_mask is None or attn_mask.dim() != 2 or not attn_mask.is_floating_point():
        return False
    if tuple(attn_mask.shape) != (tgt_len, src_len) or tgt_len != src_len or attn_mask.storage_offset() != 0:
        return False
    known = _CAUSAL_STORAGES.get(attn_mask.untyped_storage().data_ptr())
    return known is not None and known.dtype == attn_mask.dtype and attn_mask.stride() == (known.stride(0), 1)


# The Masks of the last few sets of fairseq mask tensors; a tensor modified in place gets a
# new version and misses.
_MASKS = KeptAliveCache(8)


def clear_mask_cache() -> None:
    """Forget every shared Mask (scripts/benchmark.py counts each module as the first layer
    of a stack, which builds its masks)."""
    _MASKS.clear()


# ----------------------------------------------------------------------------- projections


class _StackedLinear(torch.autograd.Function):
    """Several projections of one input in one GEMM: x [W_1; ...; W_n]^T + [b_1; ...; b_n].

    The stock module projects q, k and v of a self-attention with three GEMMs, so its
    backward pass runs three weight-gradient GEMMs, three input-gradient GEMMs, three bias
    sums and two additions of the input gradients. Stacked, that is one of each (plus the
    concatenations), and the outputs are computed with the same dot products. The weights
    stay separate parameters (fairseq's ``q_proj``/``k_proj``/``v_proj``, checkpoints
    unchanged); their concatenation is made again in the backward pass instead of being saved.
    """

    @staticmethod
    def forward(ctx, x, n, *params):
        weights, biases = params[:n], params[n:]
        flat = x.reshape(-1, x.size(-1))
        weight = torch.cat(weights)
        if biases[0] is None:
            out = flat @ weight.t()
        else:
            out = torch.addmm(torch.cat(biases), flat, weight.t())
        ctx.n, ctx.has_bias = n, biases[0] is not None
        ctx.save_for_backward(x, *weights)
        out = out.view(*x.shape[:-1], out.size(-1))
        return out.split([w.size(0) for w in weights], dim=-1)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        grads = [g if g is not None else torch.zeros(x.shape[:-1] + (w.size(0),), dtype=x.dtype, device=x.device)
                 for g, w in zip(grads, weights)]
        grad = torch.cat(grads, dim=-1).reshape(-1, sum(w.size(0) for w in weights))
        sizes = [w.size(0) for w in weights]
        # under autocast the forward GEMM ran in the autocast dtype, the gradient's: so do
        # these, and the results go back to the dtypes of x and the parameters
        dtype, param_dtype = grad.dtype, weights[0].dtype
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ torch.cat(weights).to(dtype)).view(x.shape).to(x.dtype)
        grad_w = (grad.t() @ x.reshape(-1, x.size(-1)).to(dtype)).to(param_dtype).split(sizes)
        grad_b = grad.sum(0).to(param_dtype).split(sizes) if ctx.has_bias else (None,) * ctx.n
        return (grad_x, None, *grad_w, *grad_b)


def _plain_linear(module: nn.Module) -> bool:
    """A bare nn.Linear: nothing (quant-noise, adapters, hooks) that calling it would run."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def project(x: Tensor, *linears: nn.Linear) -> Tuple[Tensor, ...]:
    """``tuple(linear(x) for linear in linears)``, in one GEMM when they are bare Linears."""
    if len(linears) == 1 or not all(_plain_linear(m) for m in linears):
        return tuple(m(x) for m in linears)
    if len({m.bias is None for m in linears}) > 1:
        return tuple(m(x) for m in linears)
    return _StackedLinear.apply(x, len(linears), *(m.weight for m in linears), *(m.bias for m in linears))


class GPAMMultiheadAttention(MultiheadAttention):
    """fairseq multi-head attention with the mechanism given at construction.

    Args are those of ``fairseq.modules.MultiheadAttention`` (passed by keyword, since
    fairseq releases differ in their positional order), plus ``mechanism``: a module
    from :func:`gpam_fairseq.attention.mechanisms.build_mechanism`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mechanism: nn.Module,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        self_attention: bool = False,
        encoder_decoder_attention: bool = False,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ):
        super().__init__(
            embed_dim=embed_dim,
            num_heads=num_heads,
            kdim=kdim,
            vdim=vdim,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            self_attention=self_attention,
            encoder_decoder_attention=encoder_decoder_attention,
            q_noise=q_noise,
            qn_block_size=qn_block_size,
        )
        self.mechanism = mechanism
        self.observers: List[Observer] = []

    @property
    def attention_type(self) -> str:
        return self.mechanism.name

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(module, q, k, mask)`` on every forward pass, with the per-head
        queries and keys (B, H, Tq, d) the mechanism receives (the daGPAM scalars use it)."""
        self.observers.append(observer)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Input shape: Time x Batch x Channel, as ``fairseq.modules.MultiheadAttention``.

        Returns ``(attn, weights)``: weights are ``None`` unless ``need_weights`` or
        ``need_head_weights``; then they are the mechanism's real (for daGPAM signed)
        weights in fp32, averaged over heads (B, Tq, Tk) or per head (H, B, Tq, Tk).
        With ``before_softmax`` returns ``(scores, v)`` like the stock module; for daGPAM
        the scores of the positive and the negative map are stacked on a leading axis.
        """
        if torch.jit.is_scripting():  # the rest is not compiled
            return self._scripted_forward(query, key, value, key_padding_mask, incremental_state, need_weights,
                                          static_kv, attn_mask, before_softmax, need_head_weights)
        need_weights = bool(need_weights or need_head_weights)
        tgt_len, bsz, embed_dim = query.size()
        if not self.skip_embed_dim_check:
            assert embed_dim == self.embed_dim, f"query dim {embed_dim} != {self.embed_dim}"
        saved_state = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        if saved_state is not None and "prev_key" in saved_state and static_kv:
            # encoder-decoder attention: keys and values were cached at the first step
            assert self.encoder_decoder_attention and not self.self_attention
            key = value = None

        q, k, v, key_padding_mask = self._project(query, key, value, key_padding_mask, bsz)
        if self.bias_k is not None:
            assert self.bias_v is not None
            k, v, key_padding_mask, attn_mask = self._add_bias(
                k=k, v=v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, bsz=bsz
            )
        q, k, v = self._split_heads(q, bsz), self._split_heads(k), self._split_heads(v)
        k, v, key_padding_mask = self._update_cache(incremental_state, saved_state, k, v, key_padding_mask, static_kv)
        kv_bsz = k.size(0)
        if self.add_zero_attn:
            k, v, key_padding_mask, attn_mask = self._append_zero_attn(
                k=k, v=v, key_padding_mask=key_padding_mask, attn_mask=attn_mask
            )
        mask = self._mask(attn_mask, key_padding_mask, tgt_len, k.size(2), kv_bsz, q)
        q, mask, beam = self._fold_beam(q, mask, kv_bsz, tgt_len)

        if before_softmax:
            scores = self.mechanism.scores(q, k, mask.dense_bias(q, k))
            scores = self._unfold_beam(scores, kv_bsz, beam, tgt_len)
            scores = scores.reshape(scores.shape[:-4] + (bsz * self.num_heads, tgt_len, -1))
            return scores, v.reshape(kv_bsz * self.num_heads, -1, v.size(-1))

        for observe in self.observers:
            observe(self, q, k, mask)
        dropout_p = self.dropout_module.p if self.training or self.dropout_module.apply_during_inference else 0.0
        out, weights = self.mechanism(q, k, v, mask, dropout_p, need_weights)
        return self._merge_heads(out, weights, kv_bsz, beam, tgt_len, bsz, need_head_weights)

    # ------------------------------------------------------------------ TorchScript

    __jit_unused_properties__ = ["attention_type"]

    def _scripted_forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]],
        need_weights: bool,
        static_kv: bool,
        attn_mask: Optional[Tensor],
        before_softmax: bool,
        need_head_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``forward`` under ``torch.jit.script``: the same stages in TorchScript's subset, with
        fairseq's masks as one dense additive bias and the mechanism's explicit reference math
        (``Mechanism.scripted``). One copy of K and V per sentence in beamable cross attention, as in
        ``forward`` (so the stock ``reorder_incremental_state`` applies), repeated over the beam for
        the product. Observers are not called."""
        need_weights = need_weights or need_head_weights
        tgt_len, bsz, embed_dim = query.size()
        saved_state: Optional[Dict[str, Optional[Tensor]]] = None
        if incremental_state is not None:
            saved_state = self._get_input_buffer(incremental_state)
            if "prev_key" in saved_state and static_kv:  # cross attention: cached at the first step
                key = None
        q = self.q_proj(query)
        k: Optional[Tensor] = None
        v: Optional[Tensor] = None
        if self.self_attention:
            k, v = self.k_proj(query), self.v_proj(query)
        elif key is not None:
            if self.encoder_decoder_attention:
                if self.beam_size > 1 and bsz == key.size(1):  # keys repeat across the beam
                    key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0, :]
                    if key_padding_mask is not None:
                        key_padding_mask = key_padding_mask.view(-1, self.beam_size, key_padding_mask.size(1))[:, 0, :]
                value = key
            assert value is not None
            k, v = self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None:
            assert k is not None and v is not None
            k, v, key_padding_mask, attn_mask = self._add_bias(k, v, key_padding_mask, attn_mask, bsz)
        q = q.view(tgt_len, bsz, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        if k is not None and v is not None:
            k = k.view(k.size(0), k.size(1), self.num_heads, self.head_dim).permute(1, 2, 0, 3)
            v = v.view(v.size(0), v.size(1), self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        if saved_state is not None:
            if "prev_key" in saved_state:
                prev_key, prev_value = saved_state["prev_key"], saved_state["prev_value"]
                assert prev_key is not None and prev_value is not None
                if static_kv or k is None or v is None:
                    k, v = prev_key, prev_value
                else:
                    k, v = torch.cat([prev_key, k], dim=2), torch.cat([prev_value, v], dim=2)
            assert k is not None and v is not None
            prev_key_padding_mask: Optional[Tensor] = None
            if "prev_key_padding_mask" in saved_state:
                prev_key_padding_mask = saved_state["prev_key_padding_mask"]
            key_padding_mask = self._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask, prev_key_padding_mask=prev_key_padding_mask,
                batch_size=k.size(0), src_len=k.size(2), static_kv=static_kv,
            )
            k, v = k.contiguous(), v.contiguous()
            saved_state["prev_key"], saved_state["prev_value"] = k, v
            saved_state["prev_key_padding_mask"] = key_padding_mask
            assert incremental_state is not None
            incremental_state = self._set_input_buffer(incremental_state, saved_state)
        assert k is not None and v is not None
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None
        if self.add_zero_attn:
            k, v, key_padding_mask, attn_mask = self._append_zero_attn(k, v, key_padding_mask, attn_mask)
        if k.size(0) != bsz:  # beamable cross attention: the beam's rows share their sentence's K and V
            repeat = bsz // k.size(0)
            k, v = k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.repeat_interleave(repeat, dim=0)
        bias: Optional[Tensor] = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    attn_mask, float("-inf"))
            bias = attn_mask.to(q.dtype).view(1, 1, attn_mask.size(-2), attn_mask.size(-1))
        if key_padding_mask is not None:
            pad = key_padding_mask.to(torch.bool).view(bsz, 1, 1, k.size(2))
            pad_bias = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill(pad, float("-inf"))
            bias = pad_bias if bias is None else bias + pad_bias
        if before_softmax:
            scores = self.mechanism.scripted_scores(q, k, bias).flatten(-4, -3)
            return scores, v.reshape(bsz * self.num_heads, -1, v.size(-1))
        training = self.training or self.dropout_module.apply_during_inference
        out, weights = self.mechanism.scripted(q, k, v, bias, self.dropout_module.p if training else 0.0, need_weights)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim))
        if weights is None:
            return out, None
        weights = weights.transpose(1, 0)  # (H, B, Tq, Tk)
        return out, (weights if need_head_weights else weights.mean(dim=0))

    # ------------------------------------------------------------------ stages

    def _project(self, query, key, value, key_padding_mask, bsz):
        """The input projections of the stock module (and its beamable cross attention); those
        of one input share one GEMM (:func:`project`)."""
        if self.self_attention:
            q, k, v = project(query, self.q_proj, self.k_proj, self.v_proj)
            return q, k, v, key_padding_mask
        q = self.q_proj(query)
        if self.encoder_decoder_attention:
            if key is None:  # cached at the first step
                assert value is None
                return q, None, None, key_padding_mask
            if self.beam_size > 1 and bsz == key.size(1):
                # keys repeat across the beam: keep one copy per sentence
                key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0, :]
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask.view(-1, self.beam_size, key_padding_mask.size(1))[:, 0, :]
            k, v = project(key, self.k_proj, self.v_proj)
            return q, k, v, key_padding_mask
        assert key is not None and value is not None
        if key is value:
            k, v = project(key, self.k_proj, self.v_proj)
        else:
            k, v = self.k_proj(key), self.v_proj(value)
        return q, k, v, key_padding_mask

    def _split_heads(self, x: Optional[Tensor], bsz: Optional[int] = None) -> Optional[Tensor]:
        """(T, B, H*d) -> (B, H, T, d), a view (the memory stays in (T, B, H, d) order)."""
        if x is None:
            return None
        return x.view(x.size(0), bsz or x.size(1), self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _update_cache(self, incremental_state, saved_state, k, v, key_padding_mask, static_kv):
        """Incremental decoding: append to (or reuse) the cached keys, values and padding mask.

        The cache holds (batch, heads, time, head_dim), as in the stock module, so the stock
        ``reorder_incremental_state`` serves beam search."""
        if saved_state is not None:
            if "prev_key" in saved_state:
                prev_key, prev_value = saved_state["prev_key"], saved_state["prev_value"]
                if static_kv:
                    k, v = prev_key, prev_value
                else:
                    k, v = torch.cat([prev_key, k], dim=2), torch.cat([prev_value, v], dim=2)
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask,
                prev_key_padding_mask=saved_state.get("prev_key_padding_mask"),
                batch_size=k.size(0),
                src_len=k.size(2),
                static_kv=static_kv,
            )
            saved_state["prev_key"] = k = k.contiguous()
            saved_state["prev_value"] = v = v.contiguous()
            saved_state["prev_key_padding_mask"] = key_padding_mask
            self._set_input_buffer(incremental_state, saved_state)
        assert k is not None and v is not None
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None
        if key_padding_mask is not None:
            assert tuple(key_padding_mask.shape) == (k.size(0), k.size(2))
        return k, v, key_padding_mask

    def _mask(self, attn_mask, key_padding_mask, tgt_len, src_len, kv_bsz, q) -> Mask:
        """fairseq's masks as one :class:`Mask`, shared by the layers that get the same ones."""
        causal = is_causal_mask(attn_mask, tgt_len, src_len)
        if attn_mask is None and key_padding_mask is None:
            return Mask()
        if causal and key_padding_mask is None:
            return Mask(causal=True)
        key = (tensor_identity(attn_mask), tensor_identity(key_padding_mask), kv_bsz, q.dtype, q.device)

        def build() -> Mask:
            attn_bias = None if attn_mask is None or causal else self._attention_bias(attn_mask, q.dtype, q.device)
            if causal:  # with padding: the causal mask as a tensor, fairseq's own
                attn_bias = attn_mask.to(q.dtype).view(1, 1, tgt_len, src_len)
            pad = None if key_padding_mask is None else key_padding_mask.to(torch.bool).view(kv_bsz, -1)
            return Mask.from_parts(attn_bias, pad, q.dtype, causal_bias=causal)

        return _MASKS.get(key, build, (attn_mask, key_padding_mask))

    @staticmethod
    def _attention_bias(attn_mask: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """fairseq's ``attn_mask`` as an additive bias broadcastable to (B, H, Tq, Tk): (Tq, Tk),
        float additive (fairseq's future mask uses -inf, the encoder's -1e8/-1e4) or boolean
        (True = masked). The key padding mask joins it in the :class:`Mask`."""
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(attn_mask, float("-inf"))
        return attn_mask.to(dtype).view(1, 1, attn_mask.size(-2), attn_mask.size(-1))

    def _fold_beam(self, q: Tensor, mask: Mask, kv_bsz: int, tgt_len: int) -> Tuple[Tensor, Mask, int]:
        """Beamable cross attention: the beam's queries share one copy of K and V, so they
        are laid side by side on the query axis (each query row is independent)."""
        beam = q.size(0) // kv_bsz
        if beam == 1:
            return q, mask, beam
        q = q.view(kv_bsz, beam, self.num_heads, tgt_len, self.head_dim)
        q = q.transpose(1, 2).reshape(kv_bsz, self.num_heads, beam * tgt_len, self.head_dim)
        if not mask.causal and mask.bias is not None and mask.bias.size(-2) > 1:
            mask = Mask(mask.bias.repeat(1, 1, beam, 1))
        return q, mask, beam

    def _merge_heads(self, out, weights, kv_bsz, beam, tgt_len, bsz, need_head_weights):
        """(B, H, Tq, d) -> (Tq, B, H*d) and the output projection; weights per head or averaged."""
        out = self._unfold_beam(out, kv_bsz, beam, tgt_len)
        with recomputed_instead_of_saved():  # the mechanism's output, when it can be rebuilt
            out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim))
        if weights is None:
            return out, None
        weights = self._unfold_beam(weights, kv_bsz, beam, tgt_len).transpose(1, 0)  # (H, B, Tq, Tk)
        return out, (weights if need_head_weights else weights.mean(dim=0))

    def _unfold_beam(self, x: Tensor, kv_bsz: int, beam: int, tgt_len: int) -> Tensor:
        """Undo the beam folding: (..., kv_bsz, H, beam*Tq, n) -> (..., kv_bsz*beam, H, Tq, n)."""
        if beam == 1:
            return x
        lead = x.shape[:-4]
        x = x.reshape(lead + (kv_bsz, self.num_heads, beam, tgt_len, x.size(-1)))
        x = x.transpose(-4, -3)
        return x.reshape(lead + (kv_bsz * beam, self.num_heads, tgt_len, x.size(-1)))

    def extra_repr(self) -> str:
        role = (
            "self_attention"
            if self.self_attention
            else "encoder_decoder_attention"
            if self.encoder_decoder_attention
            else "attention"
        )
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {role}"
