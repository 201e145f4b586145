"""Build our models (and stock ones) the way the fairseq command lines do, without data."""

import os

from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.tasks.language_modeling import LanguageModelingTask
from fairseq.tasks.translation import TranslationTask

import gpam_fairseq  # noqa: F401  (registers the models)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "gpam_fairseq")

# Dictionary sizes of the paper's setups as fairseq's recipes produce them: IWSLT14 de-en
# (10k joint BPE, separate dictionaries), WMT14/16 en-de (32k joint BPE, joined
# dictionary), WikiText-103 (word level).
IWSLT_DE, IWSLT_EN = 8848, 6632
WMT_JOINED = 32768
WIKI103 = 267744


def make_dictionary(size: int) -> Dictionary:
    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"w{i}")
    return d


def parse(cli_args):
    """fairseq-train's own parsing: argparse, the architecture defaults, then omegaconf."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/nonexistent-data", *cli_args])
    return args, convert_namespace_to_omegaconf(args)


def build_translation_model(arch, extra=(), src_size=IWSLT_DE, tgt_size=IWSLT_EN, joined=False):
    args, cfg = parse(["--task", "translation", "-s", "de", "-t", "en", "--arch", arch, *extra])
    src = make_dictionary(src_size)
    tgt = src if joined else make_dictionary(tgt_size)
    task = TranslationTask(cfg.task, src, tgt)
    return task.build_model(cfg.model)


def build_language_model(arch, extra=(), vocab=1000):
    args, cfg = parse(["--task", "language_modeling", "--arch", arch, *extra])
    d = make_dictionary(vocab)
    task = LanguageModelingTask(cfg.task, d, d, targets=["future"])
    return task.build_model(cfg.model)


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
