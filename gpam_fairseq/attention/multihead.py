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

from typing import Dict, Optional, Tuple

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn


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

    @property
    def attention_type(self) -> str:
        return self.mechanism.name

    # ------------------------------------------------------------------ layout helpers

    def _split_heads(self, x: Tensor, bsz: int) -> Tensor:
        """(T, B, H*d) -> (B, H, T, d)."""
        return x.view(x.size(0), bsz, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    @staticmethod
    def _attention_bias(
        attn_mask: Optional[Tensor],
        key_padding_mask: Optional[Tensor],
        kv_bsz: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Optional[Tensor]:
        """fairseq's masks as one additive bias broadcastable to (B, H, Tq, Tk).

        ``attn_mask`` is (Tq, Tk), float additive (fairseq's future mask uses -inf, the
        encoder's -1e8/-1e4) or boolean (True = masked); ``key_padding_mask`` is (B, Tk),
        True/1 = pad (it turns into a float 0/1 tensor in the incremental cache).
        """
        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(
                    attn_mask, float("-inf")
                )
            bias = attn_mask.to(dtype).view(1, 1, attn_mask.size(-2), attn_mask.size(-1))
        if key_padding_mask is not None:
            pad = key_padding_mask.to(torch.bool).view(kv_bsz, 1, 1, -1)
            pad_bias = torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill(
                pad, float("-inf")
            )
            bias = pad_bias if bias is None else bias + pad_bias
        return bias

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
        if need_head_weights:
            need_weights = True
        need_weights = bool(need_weights)
        tgt_len, bsz, embed_dim = query.size()
        if not self.skip_embed_dim_check:
            assert embed_dim == self.embed_dim, f"query dim {embed_dim} != {self.embed_dim}"

        saved_state = None
        if incremental_state is not None:
            saved_state = self._get_input_buffer(incremental_state)
            if "prev_key" in saved_state and static_kv:
                # encoder-decoder attention: keys and values were cached at the first step
                assert self.encoder_decoder_attention and not self.self_attention
                key = value = None

        # projections, exactly as the stock module (and its beamable cross attention)
        q = self.q_proj(query)
        if self.self_attention:
            k, v = self.k_proj(query), self.v_proj(query)
        elif self.encoder_decoder_attention:
            if key is None:
                assert value is None
                k = v = None
            else:
                if self.beam_size > 1 and bsz == key.size(1):
                    # keys repeat across the beam: keep one copy per sentence
                    key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0, :]
                    if key_padding_mask is not None:
                        key_padding_mask = key_padding_mask.view(
                            -1, self.beam_size, key_padding_mask.size(1)
                        )[:, 0, :]
                k, v = self.k_proj(key), self.v_proj(key)
        else:
            assert key is not None and value is not None
            k, v = self.k_proj(key), self.v_proj(value)

        if self.bias_k is not None:
            assert self.bias_v is not None
            k, v, key_padding_mask, attn_mask = self._add_bias(
                k=k, v=v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, bsz=bsz
            )

        q = self._split_heads(q, bsz)
        kv_bsz = bsz if k is None else k.size(1)
        if k is not None:
            k = self._split_heads(k, kv_bsz)
            v = self._split_heads(v, kv_bsz)

        if saved_state is not None:
            # the cache holds (batch, heads, time, head_dim), as in the stock module
            if "prev_key" in saved_state:
                prev_key, prev_value = saved_state["prev_key"], saved_state["prev_value"]
                kv_bsz = prev_key.size(0)
                if static_kv:
                    k, v = prev_key, prev_value
                else:
                    k = torch.cat([prev_key, k], dim=2)
                    v = torch.cat([prev_value, v], dim=2)
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask,
                prev_key_padding_mask=saved_state.get("prev_key_padding_mask"),
                batch_size=kv_bsz,
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
            assert tuple(key_padding_mask.shape) == (kv_bsz, k.size(2))

        if self.add_zero_attn:
            k, v, key_padding_mask, attn_mask = self._append_zero_attn(
                k=k, v=v, key_padding_mask=key_padding_mask, attn_mask=attn_mask
            )

        bias = self._attention_bias(attn_mask, key_padding_mask, kv_bsz, q.dtype, q.device)

        # beamable cross attention: the beam's queries share one copy of K and V, so
        # they are laid side by side on the query axis (each query row is independent)
        beam = bsz // kv_bsz
        if beam > 1:
            q = q.view(kv_bsz, beam, self.num_heads, tgt_len, self.head_dim)
            q = q.transpose(1, 2).reshape(kv_bsz, self.num_heads, beam * tgt_len, self.head_dim)
            if bias is not None and bias.size(-2) > 1:
                bias = bias.repeat(1, 1, beam, 1)

        if before_softmax:
            scores = self.mechanism.scores(q, k, bias)
            scores = self._unfold_beam(scores, kv_bsz, beam, tgt_len)
            scores = scores.reshape(scores.shape[:-4] + (bsz * self.num_heads, tgt_len, -1))
            return scores, v.reshape(kv_bsz * self.num_heads, -1, v.size(-1))

        dropout_p = (
            self.dropout_module.p
            if self.training or self.dropout_module.apply_during_inference
            else 0.0
        )
        stats = self.__dict__.get("gpam_stats")  # daGPAM scalars for the logs: attention/stats.py
        if stats is not None:
            stats.observe(self, q, k, bias)
        out, weights = self.mechanism(q, k, v, bias, dropout_p, need_weights)
        out = self._unfold_beam(out, kv_bsz, beam, tgt_len)  # (B, H, Tq, d)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        out = self.out_proj(out)

        if not need_weights:
            return out, None
        weights = self._unfold_beam(weights, kv_bsz, beam, tgt_len)  # (B, H, Tq, Tk)
        weights = weights.transpose(1, 0)
        if not need_head_weights:
            weights = weights.mean(dim=0)
        return out, weights

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
