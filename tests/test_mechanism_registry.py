"""The registry of attention types (``gpam_fairseq.attention.mechanisms.MECHANISMS``).

For every registered type, each declaration of its class agrees with what its module does,
and every place that depends on the types reads the registry: the ``--attention-type``
choices and help of fairseq-train, the options each type reads, half precision, the
tensorboard scalars, and fine-tuning a stock softmax checkpoint into the type (in Python,
and through fairseq-train for translation and, for two types, language models). A type
added with a wrong or missing declaration fails here.
"""

import os
import re

import pytest
import torch
from torch import nn

from gpam_fairseq.attention.mechanisms import MECHANISMS, Mechanism, build_mechanism, register_mechanism
from gpam_fairseq.attention.stats import AttentionStats, has_negative_map
from gpam_fairseq.checkpointing.finetune import new_parameter_names
from gpam_fairseq.options import ATTENTION_TYPES, DEFAULTS, FLAG, TYPE_OPTIONS, GPAMOptions, option_value
from gpam_fairseq.measurement.profiling import count_pass
from helpers import USER_DIR, build_language_model, build_translation_model
from test_cli import LM_ARCH, NMT_ARCH, TRAIN, cli, corpus, run_cli  # noqa: F401  (corpus: fixture)

TYPES = list(MECHANISMS)
HEADS, HEAD_DIM = 4, 8
SMALL_NMT = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
             "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--dropout", "0"]

# For each option that depends on the type: the options without it, and with it changed from
# its default. lambda_scope matters only with trainable lambdas, so both sides have them.
OPTION_CHANGES = {
    "gpam_lambda_pos": ({}, {"lambda_pos": 0.5}),
    "gpam_lambda_neg": ({}, {"lambda_neg": 0.5}),
    "gpam_trainable_lambda": ({}, {"trainable_lambda": True}),
    "gpam_lambda_scope": ({"trainable_lambda": True}, {"trainable_lambda": True, "lambda_scope": "head"}),
    "gpam_neg_query": ({}, {"neg_query": "per_head"}),
    "gpam_neg_query_init": ({}, {"neg_query_init": "random"}),
    "gpam_recompute_attention": ({}, {"recompute_attention": True}),
}


def mechanism(attention_type, **options):
    torch.manual_seed(0)
    return build_mechanism(attention_type, HEADS, HEAD_DIM, GPAMOptions(attention_type=attention_type, **options),
                           layer_index=2)


def outputs(module):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, HEADS, 5, HEAD_DIM, generator=g) for _ in range(3))
    out, weights = module(q, k, v, None, 0.0, True)
    return out, weights


def kept_for_backward(module):
    """The bytes autograd keeps for the backward pass of a fused (no weights) call."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, HEADS, 5, HEAD_DIM, generator=g, requires_grad=True) for _ in range(3))
    return count_pass(lambda: module(q, k, v, None, 0.0, False)[0], exclude=module.parameters()).saved_bytes


def differ(a: nn.Module, b: nn.Module) -> bool:
    """Whether two mechanisms differ in their parameters (names, shapes, values), outputs, or
    what they keep for the backward pass."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in sa):
        return True
    if any((x is None) != (y is None) or (x is not None and not torch.equal(x, y)) for x, y in zip(outputs(a), outputs(b))):
        return True
    return kept_for_backward(a) != kept_for_backward(b)


# ----------------------------------------------------------------------------- declarations


def test_the_options_list_and_the_choices_come_from_the_registry():
    assert ATTENTION_TYPES == tuple(TYPES) and TYPES[:2] == ["softmax", "dagpam"]
    assert set(OPTION_CHANGES) == set(TYPE_OPTIONS) <= set(FLAG)
    for name in TYPE_OPTIONS:  # each names a validated option, at its default in GPAMOptions()
        assert option_value(GPAMOptions(), name) == DEFAULTS[name]


@pytest.mark.parametrize("attention_type", TYPES)
def test_declarations_are_complete(attention_type):
    cls = MECHANISMS[attention_type]
    assert issubclass(cls, Mechanism) and cls.name == attention_type
    assert cls.help and "\n" not in cls.help
    assert set(cls.fp32_parameters) <= set(cls.new_parameters)
    assert set(cls.options_read) <= set(TYPE_OPTIONS)


def test_register_mechanism_refuses_inconsistent_declarations():
    before = dict(MECHANISMS)

    def declared(**attrs):
        return type("Probe", (Mechanism,), {"name": "probe", "help": "a probe", **attrs})

    for attrs, problem in (
        ({"name": "softmax"}, "already registered"),
        ({"name": ""}, "empty"),
        ({"help": ""}, "help"),
        ({"help": "two\nlines"}, "help"),
        ({"fp32_parameters": ("gain",)}, "fp32_parameters"),
        ({"has_negative_map": True}, "has_negative_map"),
        ({"options_read": ("gpam_lambda_pos", "gpam_no_such_option")}, "options_read"),
    ):
        with pytest.raises(TypeError, match=problem):
            register_mechanism(declared(**attrs))
    with pytest.raises(TypeError, match="not a subclass of Mechanism"):
        register_mechanism(type("Probe", (nn.Module,), {"name": "probe", "help": "a probe"}))
    assert MECHANISMS == before


@pytest.mark.parametrize("attention_type", TYPES)
def test_new_parameters_are_the_parameters_it_has_with_some_options(attention_type):
    seen = set()
    for base, changed in OPTION_CHANGES.values():
        for options in (base, changed):
            seen |= {name for name, _ in mechanism(attention_type, **options).named_parameters()}
    assert seen == set(MECHANISMS[attention_type].new_parameters)


@pytest.mark.parametrize("attention_type", TYPES)
def test_options_read_are_the_options_that_change_it(attention_type):
    read = MECHANISMS[attention_type].options_read
    for name, (base, changed) in OPTION_CHANGES.items():
        assert differ(mechanism(attention_type, **base), mechanism(attention_type, **changed)) == (name in read), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention_type", TYPES)
def test_fp32_parameters_stay_fp32_and_the_others_follow_the_model(attention_type, dtype):
    cls = MECHANISMS[attention_type]
    for options in ({}, {"trainable_lambda": True}):
        model = nn.Sequential(mechanism(attention_type, **options)).to(dtype)  # through the parent's _apply
        for name, param in model[0].named_parameters():
            assert param.dtype == (torch.float32 if name in cls.fp32_parameters else dtype), name


@pytest.mark.parametrize("attention_type", TYPES)
def test_the_scalars_are_attached_where_a_negative_map_is_declared(attention_type):
    torch.manual_seed(0)
    model = build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT + ["--attention-type", attention_type],
                                    40, 40)
    mechanisms = [m.mechanism for m in model.modules() if isinstance(getattr(m, "mechanism", None), Mechanism)]
    attached = [m for m in model.modules() if any(isinstance(o, AttentionStats) for o in getattr(m, "observers", ()))]
    assert len(mechanisms) == 3 and all(has_negative_map(m) == MECHANISMS[attention_type].has_negative_map
                                        for m in mechanisms)
    assert len(attached) == (3 if MECHANISMS[attention_type].has_negative_map else 0)


# ----------------------------------------------------------------------------- --attention-type in fairseq-train


@pytest.mark.parametrize("arch", ["transformer_gpam_iwslt_de_en", "transformer_lm_gpam"])
def test_fairseq_train_offers_every_type_with_its_help(arch):
    """fairseq's training parser offers every type as a choice of --attention-type, with its help;
    the real fairseq-train refuses another name listing them all. (fairseq-train --help cannot
    show them: it exits in fairseq's first parsing pass, before any model has added its flags.)"""
    from fairseq import options

    task = ["--task", "language_modeling"] if "_lm" in arch else []
    parser = options.get_training_parser()
    options.parse_args_and_arch(parser, ["/nonexistent-data", "--arch", arch, *task])
    action = next(a for a in parser._actions if "--attention-type" in a.option_strings)
    assert list(action.choices) == TYPES
    text = " ".join(action.help.split())
    for name, cls in MECHANISMS.items():
        assert f"'{name}' ({' '.join(cls.help.split())})" in text, name

    proc = run_cli("fairseq-train", "/nonexistent-data", "--user-dir", USER_DIR, "--arch", arch, *task,
                   "--attention-type", "no_such_type")
    assert proc.returncode != 0
    choices = ", ".join(repr(t) for t in TYPES)
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"argument --attention-type: invalid choice: 'no_such_type' (choose from {choices})")


# ----------------------------------------------------------------------------- fine-tuning a stock checkpoint


@pytest.mark.parametrize("attention_type", TYPES)
def test_stock_weights_load_strictly_and_only_the_new_parameters_start_fresh(attention_type):
    torch.manual_seed(0)
    stock = build_translation_model("transformer_iwslt_de_en", SMALL_NMT, 40, 40)
    torch.manual_seed(1)
    ours = build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT + ["--attention-type", attention_type],
                                   40, 40)
    fresh = {k: v.clone() for k, v in ours.state_dict().items()}
    added = set(ours.state_dict()) - set(stock.state_dict())
    assert added == set(new_parameter_names(ours))
    assert bool(added) == bool(MECHANISMS[attention_type].new_parameters)
    ours.load_state_dict(stock.state_dict(), strict=True)  # fairseq's path: upgrade_state_dict_named, then strict
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, fresh[key] if key in added else stock.state_dict()[key], atol=0, rtol=0)


STOCK_NMT = ["--arch", "transformer_iwslt_de_en"] + NMT_ARCH[2:]
STOCK_LM = ["--arch", "transformer_lm"] + LM_ARCH[2:]
LM_TRAIN = ["--task", "language_modeling", "--optimizer", "adam", "--lr", "1e-3", "--tokens-per-sample", "32",
            "--sample-break-mode", "none", "--max-tokens", "1024", "--seed", "1", "--no-epoch-checkpoints",
            "--log-format", "json", "--log-interval", "1"]
FEW = ["--dropout", "0", "--disable-validation", "--max-update", "3"]


@pytest.fixture(scope="module")
def stock_checkpoints(corpus):  # noqa: F811
    root = corpus["root"]
    lm_bin = os.path.join(root, "registry_lm_bin")
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{corpus['raw']}/train.tgt", "--validpref",
        f"{corpus['raw']}/valid.tgt", "--destdir", lm_bin, "--workers", "1")
    nmt_dir, lm_dir = os.path.join(root, "registry_stock_nmt"), os.path.join(root, "registry_stock_lm")
    cli("fairseq-train", corpus["bin"], *STOCK_NMT, *TRAIN, *FEW, "--save-dir", nmt_dir)
    cli("fairseq-train", lm_bin, *STOCK_LM, *LM_TRAIN, *FEW, "--save-dir", lm_dir)
    return {"nmt": os.path.join(nmt_dir, "checkpoint_last.pt"), "lm": os.path.join(lm_dir, "checkpoint_last.pt"),
            "lm_bin": lm_bin}


def finetune(data_bin, arch, train, stock_path, attention_type, save_dir):
    """fairseq-train --finetune-from-model a stock checkpoint into attention_type: 3 updates, saved."""
    out = cli("fairseq-train", data_bin, "--user-dir", USER_DIR, *arch, *train, *FEW, "--attention-type", attention_type,
              "--finetune-from-model", stock_path, "--save-dir", str(save_dir))
    assert re.search(r"loaded checkpoint .*" + re.escape(os.path.basename(stock_path)), out, re.I), out[-2000:]
    stock = torch.load(stock_path, map_location="cpu")["model"]
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu")  # weights_only
    assert state["optimizer_history"][-1]["num_updates"] == 3
    added = set(state["model"]) - set(stock)
    assert not set(stock) - set(state["model"])
    declared = MECHANISMS[attention_type].new_parameters
    assert all(k.split(".")[-2] == "mechanism" and k.split(".")[-1] in declared for k in added), sorted(added)
    # the fresh parameters are announced, never filled in silently
    assert ("initialised as a fresh model" in out) == bool(added)
    return added


@pytest.mark.parametrize("attention_type", TYPES)
def test_finetune_stock_translation_checkpoint_into_every_type(corpus, stock_checkpoints, attention_type,  # noqa: F811
                                                              tmp_path):
    added = finetune(corpus["bin"], NMT_ARCH, TRAIN, stock_checkpoints["nmt"], attention_type, tmp_path / "ft")
    assert bool(added) == bool(MECHANISMS[attention_type].new_parameters)


@pytest.mark.parametrize("attention_type", ["dagpam", "nap"])
def test_finetune_stock_language_model_checkpoint(stock_checkpoints, attention_type, tmp_path):
    added = finetune(stock_checkpoints["lm_bin"], LM_ARCH, LM_TRAIN, stock_checkpoints["lm"], attention_type,
                     tmp_path / "ft")
    assert added and {k.split(".")[-1] for k in added} <= set(MECHANISMS[attention_type].new_parameters)
