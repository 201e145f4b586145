"""transformer_lm_gpam: fairseq's Transformer language model with daGPAM self-attention.

The model is fairseq's ``TransformerLanguageModel`` with a decoder built from
:mod:`gpam_fairseq.modules.transformer` layers. Its options are fairseq's
``TransformerLanguageModelConfig`` plus :class:`gpam_fairseq.options.GPAMConfig`; a language
model has only one attention block kind, ``dec_self``.
"""

from dataclasses import dataclass, field

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    transformer_lm_baevski_wiki103,
)

from gpam_fairseq.attention import stats as gpam_stats
from gpam_fairseq.checkpointing.checkpoints import CheckedHubLoading
from gpam_fairseq.fairseq_glue.compat import refuse_fully_sharded_without_cuda
from gpam_fairseq.checkpointing.finetune import add_missing_mechanism_parameters
from gpam_fairseq.modules.transformer import GPAMTransformerDecoder
from gpam_fairseq.options import LM_ROLES, GPAMConfig, GPAMConfigError, gpam_options_from_args


@dataclass
class GPAMLanguageModelConfig(TransformerLanguageModelConfig, GPAMConfig):
    gpam_blocks: str = field(
        default="dec_self",
        metadata={"help": "attention blocks that use --attention-type; a language model has only dec_self"},
    )


@register_model("transformer_lm_gpam", dataclass=GPAMLanguageModelConfig)
class TransformerLanguageModelGPAM(CheckedHubLoading, TransformerLanguageModel):
    """Transformer language model with generalized probabilistic attention (daGPAM)."""

    @classmethod
    def build_model(cls, args, task):
        gpam = gpam_options_from_args(args, LM_ROLES)  # fail early, with the flag's name
        refuse_fully_sharded_without_cuda()
        if getattr(args, "decoder_xformers_att_config", None):
            raise GPAMConfigError(
                "--decoder-xformers-att-config: not supported by transformer_lm_gpam "
                "(its attention runs through torch scaled_dot_product_attention); drop the flag"
            )
        # fairseq's builder makes the embeddings (plain, adaptive or character) and a
        # stock decoder; we keep the embeddings and build our decoder around them. The
        # stock decoder is dropped at once (a little construction time, no copied code).
        model = super().build_model(args, task)
        model.decoder = GPAMTransformerDecoder(
            TransformerConfig.from_namespace(args),
            task.target_dictionary,
            model.decoder.embed_tokens,
            gpam,
            no_encoder_attn=True,
        )
        gpam_stats.attach(model, args)  # daGPAM scalars in the logs and tensorboard
        return model

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        gpam_stats.set_num_updates(self, num_updates)

    def upgrade_state_dict_named(self, state_dict, name):
        """Also loads stock transformer_lm checkpoints: see gpam_fairseq/checkpointing/finetune.py."""
        super().upgrade_state_dict_named(state_dict, name)
        add_missing_mechanism_parameters(self, state_dict, name)


@register_model_architecture("transformer_lm_gpam", "transformer_lm_gpam_wiki103")
def transformer_lm_gpam_wiki103(args):
    """transformer_lm_wiki103 (adaptive input, 16 layers, Pre-LN) with daGPAM."""
    transformer_lm_baevski_wiki103(args)


# The language-model sizes of the paper's recipes in examples/. Each is a stock fairseq
# architecture with some sizes fixed, so the equally sized stock baseline is that stock
# architecture with the same size flags (given in each docstring). Like every named fairseq
# LM architecture they are Pre-LN (base_lm_architecture forces it).
from fairseq.models.transformer_lm import transformer_lm_big  # noqa: E402
from fairseq.utils import safe_getattr  # noqa: E402


@register_model_architecture("transformer_lm_gpam", "transformer_lm_gpam_wiki103_8layer")
def transformer_lm_gpam_wiki103_8layer(args):
    """The paper's 8-layer WikiText-103 model: transformer_lm_wiki103 (adaptive input, d=1024)
    with 8 layers. Stock baseline: --arch transformer_lm_wiki103 --decoder-layers 8."""
    args.decoder_layers = safe_getattr(args, "decoder_layers", 8)
    transformer_lm_gpam_wiki103(args)


@register_model_architecture("transformer_lm_gpam", "transformer_lm_gpam_enwik8")
def transformer_lm_gpam_enwik8(args):
    """Character (byte) LM for Enwik8: 12 layers, d=512, FFN 2048, 8 heads (Transformer-XL's
    base size). Stock baseline: --arch transformer_lm_big --decoder-embed-dim 512
    --decoder-ffn-embed-dim 2048 --decoder-attention-heads 8."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 512)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 2048)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 8)
    transformer_lm_big(args)


@register_model_architecture("transformer_lm_gpam", "transformer_lm_gpam_ptb")
def transformer_lm_gpam_ptb(args):
    """Word LM for PTB with the paper's depth of 15 layers: d=384, FFN 1536, 6 heads, dropout
    0.3, tied input/output embeddings. Stock baseline: --arch transformer_lm_big
    --decoder-layers 15 --decoder-embed-dim 384 --decoder-ffn-embed-dim 1536
    --decoder-attention-heads 6 --dropout 0.3 --share-decoder-input-output-embed."""
    args.decoder_layers = safe_getattr(args, "decoder_layers", 15)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 384)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 1536)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 6)
    args.dropout = safe_getattr(args, "dropout", 0.3)
    args.share_decoder_input_output_embed = safe_getattr(args, "share_decoder_input_output_embed", True)
    transformer_lm_big(args)
