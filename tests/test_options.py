"""Every GPAM option is validated with a one-line error that names the flag."""

import logging

import pytest

from gpam_fairseq.options import GPAMConfigError
from helpers import build_language_model, build_translation_model

SMALL = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16"]


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--gpam-lambda-pos", "-0.5"], "--gpam-lambda-pos: must be a finite number >= 0, got -0.5"),
        (["--gpam-lambda-neg", "-1"], "--gpam-lambda-neg: must be a finite number >= 0, got -1.0"),
        (["--gpam-lambda-neg", "inf"], "--gpam-lambda-neg: must be a finite number >= 0, got inf"),
        (["--gpam-trainable-lambda", "--gpam-lambda-pos", "0"], "--gpam-lambda-pos: must be > 0 with --gpam-trainable-lambda"),
        (["--gpam-trainable-lambda", "--gpam-lambda-neg", "0"], "--gpam-lambda-neg: must be > 0 with --gpam-trainable-lambda"),
        (["--gpam-blocks", "enc_self,decoder"], "--gpam-blocks: unknown block 'decoder'; choose from enc_self, dec_self, cross"),
        (["--gpam-blocks", ","], "--gpam-blocks: empty; give a comma list from enc_self, dec_self, cross"),
        (["--encoder-xformers-att-config", "{'name': 'scaled_dot_product'}"], "--encoder-xformers-att-config: not supported"),
    ],
)
def test_translation_model_errors(flags, expected):
    with pytest.raises(GPAMConfigError) as err:
        build_translation_model("transformer_gpam_iwslt_de_en", SMALL + flags, 50, 50)
    assert expected in one_line(str(err.value))


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--gpam-blocks", "dec_self,cross"], "--gpam-blocks: 'cross' does not exist in a language model, which has only dec_self"),
        (["--gpam-blocks", "enc_self"], "--gpam-blocks: 'enc_self' does not exist in a language model"),
        (["--gpam-lambda-pos", "-2"], "--gpam-lambda-pos: must be a finite number >= 0, got -2.0"),
        (["--decoder-xformers-att-config", "{'name': 'scaled_dot_product'}"], "--decoder-xformers-att-config: not supported"),
    ],
)
def test_language_model_errors(flags, expected):
    with pytest.raises(GPAMConfigError) as err:
        build_language_model("transformer_lm_gpam", ["--decoder-layers", "1", *flags])
    assert expected in one_line(str(err.value))


@pytest.mark.parametrize(
    "arch,flag,value,allowed",
    [
        ("transformer_gpam_iwslt_de_en", "--attention-type", "linear", "'softmax', 'dagpam', 'diff', 'coda', 'nap', 'unnormalized'"),
        ("transformer_gpam_iwslt_de_en", "--gpam-lambda-scope", "layer", "'module', 'head'"),
        ("transformer_gpam_iwslt_de_en", "--gpam-neg-query", "global", "'shared', 'per_head'"),
        ("transformer_gpam_iwslt_de_en", "--gpam-neg-query-init", "identity", "'neg_identity', 'random'"),
        ("transformer_gpam_iwslt_de_en", "--gpam-lambda-pos", "big", None),
        ("transformer_lm_gpam", "--attention-type", "linear", "'softmax', 'dagpam', 'diff', 'coda', 'nap', 'unnormalized'"),
        ("transformer_lm_gpam", "--gpam-neg-query-init", "zeros", "'neg_identity', 'random'"),
    ],
)
def test_argparse_rejects_bad_values_naming_the_flag(arch, flag, value, allowed, capsys):
    builder = build_language_model if "_lm" in arch else build_translation_model
    with pytest.raises(SystemExit):
        builder(arch, [flag, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: invalid" in err
    if allowed:
        assert f"invalid choice: '{value}' (choose from {allowed})" in err


def test_every_flag_has_help_text():
    from fairseq import options

    from gpam_fairseq.options import FLAG

    parser = options.get_training_parser()
    options.parse_args_and_arch(parser, ["/nonexistent", "--arch", "transformer_gpam_iwslt_de_en", "--task", "translation"])
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for flag in FLAG.values():
        assert flag in actions, flag
        assert actions[flag].help and len(actions[flag].help) > 20, flag


# ----------------------------------------------------------------------------- lambda- against lambda+


def refused(pos, neg):
    return (f"--gpam-lambda-neg: {neg:g} >= 1 + --gpam-lambda-pos ({pos:g}); rows of P_G would sum to "
            f"1 + lambda+ - lambda- = {1 + pos - neg:g} <= 0; choose --gpam-lambda-neg < 1 + --gpam-lambda-pos")


# (lambda+, lambda-, trainable); trainable lambdas must start > 0, a rule of their own
@pytest.mark.parametrize("pos,neg,trainable", [(1.2, 2.5, False), (0.5, 1.5, False), (0.0, 1.0, False),
                                               (0.0, 3.0, False), (1.2, 2.5, True), (0.5, 1.5, True)])
def test_a_negative_map_that_outweighs_the_positive_one_is_refused(pos, neg, trainable):
    """Rows of P_G sum to 1 + lambda+ - lambda-: lambda- >= 1 + lambda+ leaves them none (sum <= 0)."""
    flags = ["--gpam-lambda-pos", str(pos), "--gpam-lambda-neg", str(neg)] + (["--gpam-trainable-lambda"] if trainable else [])
    for build in (lambda: build_translation_model("transformer_gpam_iwslt_de_en", SMALL + flags, 50, 50),
                  lambda: build_language_model("transformer_lm_gpam", ["--decoder-layers", "1", *flags])):
        with pytest.raises(GPAMConfigError) as err:
            build()
        assert one_line(str(err.value)) == refused(pos, neg)


def test_lambda_neg_just_below_one_plus_lambda_pos_is_accepted():
    model = build_translation_model("transformer_gpam_iwslt_de_en",
                                    SMALL + ["--gpam-lambda-pos", "0.5", "--gpam-lambda-neg", "1.49"], 50, 50)
    assert model.encoder.layers[0].self_attn.mechanism.lambdas() == (0.5, 1.49)


# ----------------------------------------------------------------------------- options a type does not read

OPTIONS_LOGGER = "gpam_fairseq.options"
SOFTMAX_WITH_GPAM_FLAGS = ["--attention-type", "softmax", "--gpam-lambda-pos", "0.5", "--gpam-neg-query", "per_head"]
NOT_READ = ("--attention-type softmax does not read --gpam-lambda-pos, --gpam-neg-query (set away from their "
            "defaults; read by dagpam): they have no effect")


@pytest.fixture
def reports(monkeypatch, caplog):
    """The warnings of gpam_fairseq.options, as a fresh process would make them."""
    from gpam_fairseq import options

    monkeypatch.setattr(options, "_reported", set())
    caplog.set_level(logging.WARNING, logger=OPTIONS_LOGGER)
    return lambda: [r.getMessage() for r in caplog.records if r.name == OPTIONS_LOGGER and r.levelno == logging.WARNING]


def test_options_the_type_does_not_read_are_reported_once_in_one_line(reports):
    for _ in range(2):  # every model builds its encoder and decoder from the same options: still one report
        build_translation_model("transformer_gpam_iwslt_de_en", SMALL + SOFTMAX_WITH_GPAM_FLAGS, 50, 50)
    assert reports() == [NOT_READ]
    # the refusal above only concerns types that read both lambdas: softmax is told, not stopped
    build_translation_model("transformer_gpam_iwslt_de_en", SMALL + ["--attention-type", "coda", "--gpam-lambda-neg", "3"],
                            50, 50)
    assert reports()[1:] == ["--attention-type coda does not read --gpam-lambda-neg (set away from their defaults; "
                             "read by dagpam): they have no effect"]


def test_no_report_where_the_type_reads_them_or_they_are_at_their_defaults(reports):
    build_translation_model("transformer_gpam_iwslt_de_en", SMALL + SOFTMAX_WITH_GPAM_FLAGS[2:], 50, 50)  # dagpam
    build_translation_model("transformer_gpam_iwslt_de_en", SMALL + ["--attention-type", "diff"], 50, 50)
    # "given" means "not at the default": the defaults spelt out change nothing, so nothing to report
    build_translation_model("transformer_gpam_iwslt_de_en",
                            SMALL + ["--attention-type", "nap", "--gpam-lambda-pos", "0.2", "--gpam-neg-query", "shared"],
                            50, 50)
    assert reports() == []


def test_language_model_reports_too(reports):
    build_language_model("transformer_lm_gpam", ["--decoder-layers", "1", "--attention-type", "nap",
                                                 "--gpam-trainable-lambda", "--gpam-lambda-scope", "head"])
    assert reports() == ["--attention-type nap does not read --gpam-trainable-lambda, --gpam-lambda-scope (set away "
                         "from their defaults; read by dagpam): they have no effect"]


# ----------------------------------------------------------------------------- parsed once


@pytest.mark.parametrize("kind", ["translation", "language_model"])
def test_options_are_parsed_once_per_model_build(kind, monkeypatch):
    """The encoder, the decoder and every layer get the options that build_model parsed."""
    from gpam_fairseq import options
    from gpam_fairseq.models import transformer_gpam, transformer_lm_gpam

    calls = []

    def counted(args, available_blocks):
        calls.append(available_blocks)
        return options.gpam_options_from_args(args, available_blocks)

    for module in (transformer_gpam, transformer_lm_gpam):
        monkeypatch.setattr(module, "gpam_options_from_args", counted)
    flags = ["--gpam-lambda-pos", "0.3"]
    model = (build_translation_model("transformer_gpam_iwslt_de_en", SMALL + flags, 50, 50) if kind == "translation"
             else build_language_model("transformer_lm_gpam", ["--decoder-layers", "2", *flags]))
    assert len(calls) == 1
    layers = [*getattr(getattr(model, "encoder", None), "layers", []), *model.decoder.layers]
    assert layers and all(layer.self_attn.mechanism.lambdas() == (0.3, 0.2) for layer in layers)
