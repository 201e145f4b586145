"""transformer_gpam: fairseq's Transformer for translation, with daGPAM attention.

The model is fairseq's ``TransformerModel`` whose encoder and decoder build
:mod:`gpam_fairseq.modules.transformer` layers. Every architecture has the
hyperparameters of the stock architecture of the same name, plus the GPAM options
(see ``gpam_fairseq/options.py`` and the README). ``--attention-type softmax`` gives the
stock Transformer, computed by the same code, for baselines.
"""

import argparse
from contextvars import ContextVar
from typing import Optional

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerModel
from fairseq.models.transformer import transformer_legacy as stock
from omegaconf import OmegaConf

from gpam_fairseq.attention import stats as gpam_stats
from gpam_fairseq.attention.config import GPAMOptions
from gpam_fairseq.checkpointing.checkpoints import CheckedHubLoading
from gpam_fairseq.fairseq_glue.compat import refuse_fully_sharded_without_cuda
from gpam_fairseq.checkpointing.finetune import add_missing_mechanism_parameters
from gpam_fairseq.modules.transformer import GPAMTransformerDecoder, GPAMTransformerEncoder
from gpam_fairseq.options import (
    NMT_ROLES,
    GPAMConfig,
    GPAMConfigError,
    gpam_options_from_args,
    set_gpam_defaults,
)

# The options build_model has parsed, for the build_encoder/build_decoder calls fairseq's
# builder makes inside it (they receive a TransformerConfig, not the options)
_BUILDING: ContextVar[Optional[GPAMOptions]] = ContextVar("gpam_options_being_built", default=None)


@register_model("transformer_gpam")
class TransformerGPAMModel(CheckedHubLoading, TransformerModel):
    """Transformer (Vaswani et al., 2017) with generalized probabilistic attention
    (daGPAM; Heo & Choi, 2024) in the blocks named by ``--gpam-blocks``."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # no argparse defaults: the architecture functions fill them (fairseq convention)
        gen_parser_from_dataclass(parser, GPAMConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # fairseq-hydra-train (and checkpoints it wrote) pass a DictConfig, whose GPAM keys
            # TransformerConfig.from_namespace would drop (vars() of a DictConfig): go on with
            # a Namespace, exactly as fairseq-train does
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        set_gpam_defaults(args, NMT_ROLES)
        gpam = gpam_options_from_args(args, NMT_ROLES)  # once per model, and early: errors name the flag
        refuse_fully_sharded_without_cuda()
        for side in ("encoder", "decoder"):
            if getattr(args, f"{side}_xformers_att_config", None):
                raise GPAMConfigError(
                    f"--{side}-xformers-att-config: not supported by transformer_gpam "
                    "(its attention runs through torch scaled_dot_product_attention); drop the flag"
                )
        building = _BUILDING.set(gpam)
        try:
            model = super().build_model(args, task)
        finally:
            _BUILDING.reset(building)
        gpam_stats.attach(model, args)  # daGPAM scalars in the logs and tensorboard
        return model

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        gpam_stats.set_num_updates(self, num_updates)

    @staticmethod
    def _options(cfg) -> GPAMOptions:
        """The options build_model parsed; read from ``cfg`` where build_encoder/build_decoder
        are called on their own."""
        return _BUILDING.get() or gpam_options_from_args(cfg, NMT_ROLES)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return GPAMTransformerEncoder(cfg, src_dict, embed_tokens, cls._options(cfg))

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return GPAMTransformerDecoder(
            cfg,
            tgt_dict,
            embed_tokens,
            cls._options(cfg),
            no_encoder_attn=cfg.no_cross_attention,
        )

    def upgrade_state_dict_named(self, state_dict, name):
        """Also loads stock transformer checkpoints: see gpam_fairseq/checkpointing/finetune.py."""
        super().upgrade_state_dict_named(state_dict, name)
        add_missing_mechanism_parameters(self, state_dict, name)


def _gpam_architecture(stock_architecture):
    """Register transformer_gpam<suffix> with the stock architecture's hyperparameters."""

    def architecture(args):
        set_gpam_defaults(args, NMT_ROLES)
        stock_architecture(args)

    return architecture


for _name, _stock in (
    ("transformer_gpam", stock.base_architecture),
    ("transformer_gpam_iwslt_de_en", stock.transformer_iwslt_de_en),
    ("transformer_gpam_wmt_en_de", stock.transformer_wmt_en_de),
    ("transformer_gpam_vaswani_wmt_en_de_big", stock.transformer_vaswani_wmt_en_de_big),
):
    register_model_architecture("transformer_gpam", _name)(_gpam_architecture(_stock))
