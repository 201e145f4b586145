"""What many tests share: the repository's paths, our models (and stock ones) built the way
the fairseq command lines build them without data (gpam_fairseq.fairseq_glue.tools), parameter counts."""

import os

import gpam_fairseq  # noqa: F401  (registers the models)
from gpam_fairseq.fairseq_glue.tools import (  # noqa: F401  (the tests import them from here)
    IWSLT_DE, IWSLT_EN, USER_DIR, WIKI103, WMT_JOINED, build_language_model, build_translation_model, make_dictionary)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count(params):
    return sum(p.numel() for p in params)


def gpam_parameter_share(model):
    """(extra daGPAM parameters, all parameters, share in percent)."""
    extra = count(p for n, p in model.named_parameters() if ".mechanism." in n)
    total = count(model.parameters())
    return extra, total, 100.0 * extra / total


def attention_modules(model):
    from gpam_fairseq.attention.multihead import GPAMMultiheadAttention

    return {n: m for n, m in model.named_modules() if isinstance(m, GPAMMultiheadAttention)}
