"""fairseq's Transformer layers and stacks with the attention of each block chosen by GPAMOptions.

Each class is the stock fairseq class with one thing swapped: the layers build a
:class:`GPAMMultiheadAttention` (``build_self_attention`` / ``build_encoder_attention``,
the override points fairseq's own Linformer example uses), and the stacks build those
layers, keeping fairseq's activation checkpointing and FSDP wrapping around them.
The options travel explicitly, not through ``TransformerConfig`` (which drops unknown
keys when a language model's args are a DictConfig).
"""

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)

from gpam_fairseq.attention.mechanisms import build_mechanism
from gpam_fairseq.attention.multihead import GPAMMultiheadAttention, mark_causal
from gpam_fairseq.options import GPAMOptions


def build_attention(role: str, gpam: GPAMOptions, embed_dim: int, num_heads: int, layer_index: int = 1, **kwargs):
    """The attention module of one block: role is enc_self, dec_self or cross; layer_index
    is the block's layer in its stack, 1-based (diff's lambda_init depends on it)."""
    mechanism = build_mechanism(gpam.type_for(role), num_heads, embed_dim // num_heads, gpam, layer_index)
    return GPAMMultiheadAttention(embed_dim, num_heads, mechanism, **kwargs)


def wrap_layer(layer, cfg):
    """Activation checkpointing and FSDP wrapping, as fairseq's build_*_layer apply them."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    # when checkpointing, FSDP always wraps the checkpointed layer, whatever its size
    min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


class GPAMTransformerEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg, gpam: GPAMOptions, return_fc=False, layer_index: int = 1):
        self.gpam = gpam  # read by build_self_attention inside the base constructor
        self.layer_index = layer_index
        super().__init__(cfg, return_fc=return_fc)
        # fairseq 0.12.2 only: its "BetterTransformer" fast path would replace our
        # attention by torch._transformer_encoder_layer_fwd at inference. No-op elsewhere.
        self.BT_version = False

    def build_self_attention(self, embed_dim, cfg):
        return build_attention(
            "enc_self",
            self.gpam,
            embed_dim,
            cfg.encoder.attention_heads,
            layer_index=self.layer_index,
            dropout=cfg.attention_dropout,
            self_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )


class GPAMTransformerDecoderLayer(TransformerDecoderLayerBase):
    def __init__(
        self, cfg, gpam: GPAMOptions, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False, layer_index: int = 1
    ):
        self.gpam = gpam
        self.layer_index = layer_index
        super().__init__(
            cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn
        )

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        return build_attention(
            "dec_self",
            self.gpam,
            embed_dim,
            cfg.decoder.attention_heads,
            layer_index=self.layer_index,
            dropout=cfg.attention_dropout,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            self_attention=not cfg.cross_self_attention,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )

    def build_encoder_attention(self, embed_dim, cfg):
        return build_attention(
            "cross",
            self.gpam,
            embed_dim,
            cfg.decoder.attention_heads,
            layer_index=self.layer_index,
            kdim=cfg.encoder.embed_dim,
            vdim=cfg.encoder.embed_dim,
            dropout=cfg.attention_dropout,
            encoder_decoder_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )


class GPAMTransformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, gpam: GPAMOptions, return_fc=False):
        self.gpam = gpam  # read by build_encoder_layer inside the base constructor
        self.layers_built = 0  # fairseq builds the layers in order, in a list comprehension
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        self.BT_version = False  # fairseq 0.12.2 only, see GPAMTransformerEncoderLayer

    def build_encoder_layer(self, cfg):
        self.layers_built += 1
        layer = GPAMTransformerEncoderLayer(cfg, self.gpam, return_fc=self.return_fc, layer_index=self.layers_built)
        return wrap_layer(layer, cfg)


class GPAMTransformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, gpam: GPAMOptions, no_encoder_attn=False, output_projection=None):
        self.gpam = gpam
        self.layers_built = 0  # fairseq builds the layers in order, in a list comprehension
        super().__init__(
            cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection
        )

    def buffered_future_mask(self, tensor):
        """fairseq's future mask, recorded as causal: the attention then takes the fused
        kernel's causal path (``is_causal``, no mask tensor) when there is no padding."""
        if torch.jit.is_scripting():  # TorchScript has no super(): the same mask, made afresh
            dim = tensor.size(0)
            return torch.triu(torch.full((dim, dim), float("-inf"), dtype=tensor.dtype, device=tensor.device), 1)
        return mark_causal(super().buffered_future_mask(tensor))

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        self.layers_built += 1
        layer = GPAMTransformerDecoderLayer(
            cfg, self.gpam, no_encoder_attn=no_encoder_attn, layer_index=self.layers_built
        )
        return wrap_layer(layer, cfg)
