"""The recipes' models side by side: each MODEL's fairseq-train command line (as the train stage
builds it), the model fairseq builds for it (on the meta device) and its parameter count, and the
parameter tables of examples/*/README.md.

The controls themselves (what MODEL=baseline_params and MODEL=baseline_maps change, and
ControlError) are :mod:`gpam_fairseq.recipes.matched_controls`, below the recipes' stages.
"""

import contextlib
import os
from typing import Dict, List, Sequence

from gpam_fairseq.recipes.matched_controls import DICTIONARIES, ControlError, ffn_stacks


# ----------------------------------------------------------------------------- parameter tables


@contextlib.contextmanager
def environment(**values):
    """Set environment variables (None: unset) for the recipe's Settings, restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MODELS = ("baseline", "baseline_maps", "baseline_params", "gpam")


def recipe_commands(recipe, size: str, models: Sequence[str] = MODELS, **env) -> Dict[str, List[str]]:
    """fairseq-train's command line of each MODEL value for a recipe size (defaults of every other
    variable unless given in env, one GPU), as the train stage builds it."""
    from gpam_fairseq.recipes.stages import Settings, train_command

    base = {"SIZE": size, "NGPUS": "1", "DATA_DIR": "/nonexistent-data", "EXTRA_ARGS": None, "GPAM_ARGS": None,
            "UPDATE_FREQ": None, "MAX_UPDATE": None, "RUN_NAME": None, "SEED": None, "FP16": None,
            "PRECISION": None}
    base.update(env)
    out = {}
    for model in models:
        with environment(**base, MODEL=model):
            out[model] = train_command(Settings(recipe))[0]
    return out


def build_from_command(cmd: Sequence[str], recipe_name: str, device: str = "meta"):
    """The model fairseq-train builds for a recipe command line (the executable and the data
    folder dropped), with dictionaries of the sizes in DICTIONARIES; on the meta device by
    default (every module and parameter, no memory)."""
    import torch

    from gpam_fairseq.fairseq_glue.tools import make_dictionary, parse_training_args, task_without_data, translation_dictionaries

    _, cfg = parse_training_args(list(cmd[2:]))
    sizes = DICTIONARIES[recipe_name]
    src, tgt = translation_dictionaries(*sizes) if isinstance(sizes, tuple) else (make_dictionary(sizes),) * 2
    with torch.device(device):
        return task_without_data(cfg, src, tgt).build_model(cfg.model)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_counts(recipe, size: str):
    """(parameters of the model of each MODEL value of a recipe size, from the built models;
    the command lines they were built from)."""
    cmds = recipe_commands(recipe, size)
    return {m: count_parameters(build_from_command(cmd, recipe.name)) for m, cmd in cmds.items()}, cmds


def parameter_table(recipe) -> str:
    """The Markdown table of the recipe README: parameters of baseline, baseline_maps,
    baseline_params and gpam for every size, from the built models."""
    lines = ["| SIZE | baseline | baseline_maps | baseline_params | gpam (daGPAM) | baseline_params − gpam | "
             "gpam − baseline | flags of the controls |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    n = 2 * len(ffn_stacks(recipe.task))  # the controls' flags: the last n words of their command lines
    for size in recipe.sizes:
        counts, cmds = parameter_counts(recipe, size)
        b, p, g = counts["baseline"], counts["baseline_params"], counts["gpam"]
        lines.append(
            f"| `{size}` | {b:,} | {counts['baseline_maps']:,} | {p:,} | {g:,} | {p - g:+,} ({100.0 * (p - g) / g:+.5f} %) | "
            f"{g - b:+,} ({100.0 * (g - b) / b:+.3f} %) | baseline_params: {_flag_pairs(cmds['baseline_params'][-n:])}; "
            f"baseline_maps: {_flag_pairs(cmds['baseline_maps'][-n:])} |")
    return "\n".join(lines)


def _flag_pairs(flags: Sequence[str]) -> str:
    return ", ".join(f"`{flags[i]} {flags[i + 1]}`" for i in range(0, len(flags), 2))


TABLE_BEGIN = "<!-- parameter-counts: begin (python scripts/parameter_counts.py --update) -->"
TABLE_END = "<!-- parameter-counts: end -->"


def readme_table(text: str) -> str:
    """The parameter table between the markers of a recipe README."""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ControlError(f"no '{TABLE_BEGIN}' ... '{TABLE_END}' block in the README")
    return text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()


def replace_readme_table(text: str, table: str) -> str:
    head, rest = text.split(TABLE_BEGIN, 1)
    return f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"
