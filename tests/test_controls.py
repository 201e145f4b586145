"""The matched baselines MODEL=baseline_params and MODEL=baseline_maps of every recipe.

Parameter counts are those of the models fairseq-train builds for the recipes' command lines
(built on the meta device: every module and parameter, no memory; the IWSLT ones also for real
on the CPU to show the two counts agree); the recipe READMEs' tables must equal them.
"""

import os
import re

import pytest

from gpam_fairseq.recipes import controls
from gpam_fairseq.recipes.matched_controls import model_args
from gpam_fairseq.recipes.definitions import RECIPES
from helpers import REPO

ALL_SIZES = [(name, size) for name, r in RECIPES.items() for size in r.sizes]


@pytest.fixture(scope="module")
def tables():
    return {name: controls.parameter_table(r) for name, r in RECIPES.items()}


def test_readme_parameter_tables_are_the_built_models_and_match_within_0_1_percent(tables):
    for name, table in tables.items():
        with open(os.path.join(REPO, "examples", name, "README.md"), encoding="utf-8") as f:
            assert controls.readme_table(f.read()) == table, (
                f"examples/{name}/README.md: parameter table out of date; run python scripts/parameter_counts.py --update")
        for line in table.splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            baseline, maps, params, gpam = (int(c.replace(",", "")) for c in cells[1:5])
            assert maps == baseline  # more heads, same projections
            assert gpam > baseline and abs(params - gpam) / gpam < 1e-3, line  # within 0.1 %


def test_meta_device_counts_equal_real_cpu_models():
    recipe = RECIPES["iwslt14"]
    meta, cmds = controls.parameter_counts(recipe, "base")
    for model, cmd in cmds.items():
        assert controls.count_parameters(controls.build_from_command(cmd, recipe.name, device="cpu")) == meta[model]


def _tail(cmd, base):
    assert cmd[:len(base)] == base, "the control must keep the baseline's command line as it is"
    return cmd[len(base):]


@pytest.mark.parametrize("name,size", ALL_SIZES)
def test_command_lines_differ_only_where_they_should(name, size):
    recipe = RECIPES[name]
    raw = controls.recipe_commands(recipe, size, LN="pre" if recipe.task == "translation" else None)
    # the run folder and checkpoint paths name the MODEL value: the only place they differ besides the flags below
    for model, cmd in raw.items():
        assert sum(f"/{model}_{size}" in c for c in cmd) == 2  # --save-dir, --tensorboard-logdir
    cmds = {m: [c.replace(f"/{m}_{size}", "/MODEL_") for c in cmd] for m, cmd in raw.items()}
    base = cmds["baseline"]
    stacks = ["encoder", "decoder"] if recipe.task == "translation" else ["decoder"]
    stock = model_args(tuple(base[2:]))
    # baseline_params: the baseline's line, then one wider FFN per stack, nothing else
    tail = _tail(cmds["baseline_params"], base)
    assert tail[::2] == [f"--{s}-ffn-embed-dim" for s in stacks]
    assert all(int(w) > getattr(stock, f"{s}_ffn_embed_dim") for s, w in zip(stacks, tail[1::2]))
    # baseline_maps: the baseline's line, then twice the heads per stack (head dimension still an integer)
    tail = _tail(cmds["baseline_maps"], base)
    assert tail[::2] == [f"--{s}-attention-heads" for s in stacks]
    maps = model_args(tuple(cmds["baseline_maps"][2:]))
    for s in stacks:
        assert getattr(maps, f"{s}_attention_heads") == 2 * getattr(stock, f"{s}_attention_heads")
        assert getattr(maps, f"{s}_embed_dim") == getattr(stock, f"{s}_embed_dim")
        assert getattr(maps, f"{s}_embed_dim") % getattr(maps, f"{s}_attention_heads") == 0
    # gpam: the architecture and the attention type, nothing else
    size_def = recipe.sizes[size]
    strip = {"--arch", "--attention-type", "dagpam", *size_def.baseline, *size_def.gpam}
    assert [c for c in cmds["gpam"] if c not in strip] == [c for c in base if c not in strip]


def test_baseline_params_follows_the_gpam_options_and_shrunk_models():
    """GPAM_ARGS that add parameters (per-head W_Q-, trainable per-head lambdas, fewer blocks) and a
    shrunk model in EXTRA_ARGS give their own matched widths, within 0.1 % of the built models; the
    baseline and baseline_maps ignore GPAM_ARGS."""
    recipe = RECIPES["iwslt14"]
    plain = controls.recipe_commands(recipe, "base")
    for gpam_args, extra in (("--gpam-neg-query per_head --gpam-trainable-lambda --gpam-lambda-scope head", ""),
                             ("--gpam-blocks enc_self", ""),
                             ("", "--encoder-layers 2 --decoder-layers 1 --encoder-embed-dim 64 --decoder-embed-dim 32 "
                                  "--encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 64 --encoder-attention-heads 4 "
                                  "--decoder-attention-heads 2")):
        cmds = controls.recipe_commands(recipe, "base", GPAM_ARGS=gpam_args, EXTRA_ARGS=extra)
        if gpam_args:
            assert cmds["gpam"][-len(gpam_args.split()):] == gpam_args.split()
            assert cmds["baseline"] == plain["baseline"] and cmds["baseline_maps"] == plain["baseline_maps"]
            assert cmds["baseline_params"] != plain["baseline_params"]
        counts = {m: controls.count_parameters(controls.build_from_command(cmds[m], "iwslt14"))
                  for m in ("baseline", "baseline_params", "gpam")}
        assert counts["gpam"] != counts["baseline"]
        assert abs(counts["baseline_params"] - counts["gpam"]) / counts["gpam"] < 1e-3, (gpam_args, extra, counts)


def test_baseline_maps_refuses_a_width_the_doubled_heads_do_not_divide(monkeypatch, tmp_path):
    from gpam_fairseq.recipes.common import RecipeError
    from gpam_fairseq.recipes.stages import Settings, train_command

    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MODEL", "baseline_maps")
    monkeypatch.setenv("EXTRA_ARGS", "--encoder-embed-dim 36 --encoder-attention-heads 12")
    with pytest.raises(RecipeError, match=re.escape("MODEL=baseline_maps: --encoder-embed-dim 36 is not divisible "
                                                    "by 2 x --encoder-attention-heads (24)")):
        train_command(Settings(RECIPES["iwslt14"]))
