"""Every GPAM option is validated with a one-line error that names the flag."""

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
