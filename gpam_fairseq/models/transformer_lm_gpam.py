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

from gpam_fairseq.modules.transformer import GPAMTransformerDecoder
from gpam_fairseq.options import LM_ROLES, GPAMConfig, gpam_options_from_args


@dataclass
class GPAMLanguageModelConfig(TransformerLanguageModelConfig, GPAMConfig):
    gpam_blocks: str = field(
        default="dec_self",
        metadata={"help": "attention blocks that use --attention-type; a language model has only dec_self"},
    )


@register_model("transformer_lm_gpam", dataclass=GPAMLanguageModelConfig)
class TransformerLanguageModelGPAM(TransformerLanguageModel):
    """Transformer language model with generalized probabilistic attention (daGPAM)."""

    @classmethod
    def build_model(cls, args, task):
        gpam = gpam_options_from_args(args, LM_ROLES)  # fail early, with the flag's name
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
        return model


@register_model_architecture("transformer_lm_gpam", "transformer_lm_gpam_wiki103")
def transformer_lm_gpam_wiki103(args):
    """transformer_lm_wiki103 (adaptive input, 16 layers, Pre-LN) with daGPAM."""
    transformer_lm_baevski_wiki103(args)
