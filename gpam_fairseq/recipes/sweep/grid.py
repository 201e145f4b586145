"""The grid of a λ sweep: its settings × seeds as cells (one recipe run each), their status on disk, and
:func:`run_cell`, which runs one cell through the recipe's train and evaluate stages."""

import argparse
import itertools
import json
import os
import shlex
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from gpam_fairseq.recipes import controls, matched_controls
from gpam_fairseq.recipes.common import RecipeError, done_marker, env, env_args, last_flag
from gpam_fairseq.recipes import registry


# --quick: a tiny model and a few updates, on the fixture or any small data (CPU, minutes)
QUICK_NMT = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
             "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
             "--decoder-attention-heads 2 --max-tokens 1024 --warmup-updates 5 --lr 3e-3 --no-epoch-checkpoints "
             "--log-interval 2")
QUICK_LM = ("--decoder-layers 1 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "
            "--tokens-per-sample 32 --max-tokens 512 --warmup-updates 2 --no-epoch-checkpoints --log-interval 2")
QUICK_MAX_UPDATE = 10

# the recipe variables a cell takes from the sweep's environment (so that a job on another
# machine sees the same; see gpam_fairseq/recipes/stages.py)
PASSED_ON = ("TASK", "SRC", "TGT", "LOWERCASE", "SIZE", "SETUP", "DIRECTION", "LN", "DATA_DIR", "NGPUS", "PRECISION", "FP16", "UPDATE_FREQ", "AVERAGE", "WORKERS",
             "MAX_UPDATE", "EVAL_ARGS", "EXTRA_ARGS", "GPAM_ARGS")


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class GridSystem:
    """One system of the grid: a baseline, or daGPAM with its settings."""

    model: str  # "gpam", or one of matched_controls.BASELINES
    lambda_pos: Optional[float] = None
    lambda_neg: Optional[float] = None
    trainable: bool = False
    neg_query_init: str = "neg_identity"
    neg_query: str = "shared"
    blocks: str = "all"

    @property
    def is_gpam(self):
        return self.model == "gpam"

    def tag(self) -> str:
        if not self.is_gpam:
            return self.model
        init = {"neg_identity": "negid", "random": "random"}[self.neg_query_init]
        sharing = {"shared": "shared", "per_head": "perhead"}[self.neg_query]
        return (f"gpam_lp{self.lambda_pos:g}_ln{self.lambda_neg:g}_{'trainable' if self.trainable else 'fixed'}_"
                f"{init}_{sharing}_{self.blocks.replace(',', '+')}")

    def gpam_args(self) -> List[str]:
        if not self.is_gpam:
            return []
        args = ["--gpam-lambda-pos", f"{self.lambda_pos:g}", "--gpam-lambda-neg", f"{self.lambda_neg:g}",
                "--gpam-neg-query-init", self.neg_query_init, "--gpam-neg-query", self.neg_query]
        if self.trainable:
            args.append("--gpam-trainable-lambda")
        if self.blocks != "all":
            args += ["--gpam-blocks", self.blocks]
        return args


@dataclass
class Cell:
    setting: GridSystem
    seed: int
    run_name: str
    run_dir: str
    save_dir: str
    spec: Dict


def _floats(values, flag):
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            raise RecipeError(f"{flag} {v!r}: expected numbers, e.g. {flag} 0.1 0.2 0.5") from None
    return out


def grid_settings(args, recipe) -> List[GridSystem]:
    """The daGPAM settings of the grid (λ+ × λ− × trainable × init × sharing × blocks), validated
    by the options' own rules, then the baselines."""
    from gpam_fairseq.options import (LM_ROLES, NEG_QUERY_INITS, NEG_QUERY_SHARING, NMT_ROLES, GPAMConfigError,
                                      gpam_options_from_args)

    roles = NMT_ROLES if recipe.task == "translation" else LM_ROLES
    pos = _floats(args.lambda_pos, "--lambda-pos")
    tied = args.lambda_neg == ["same"]
    neg = None if tied else _floats(args.lambda_neg, "--lambda-neg")
    for flag, values, allowed in (("--neg-query-init", args.neg_query_init, NEG_QUERY_INITS),
                                  ("--neg-query", args.neg_query, NEG_QUERY_SHARING),
                                  ("--lambda", args.lambda_mode, ("fixed", "trainable"))):
        for v in values:
            if v not in allowed:
                raise RecipeError(f"{flag} {v!r}: choose from {', '.join(allowed)}")
    settings = []
    for lp, ln, mode, init, sharing, blocks in itertools.product(
            pos, [None] if tied else neg, args.lambda_mode, args.neg_query_init, args.neg_query, args.blocks):
        s = GridSystem("gpam", lp, lp if tied else ln, mode == "trainable", init, sharing, blocks)
        ns = argparse.Namespace(attention_type="dagpam", gpam_lambda_pos=s.lambda_pos, gpam_lambda_neg=s.lambda_neg,
                                gpam_trainable_lambda=s.trainable, gpam_neg_query_init=init, gpam_neg_query=sharing,
                                gpam_blocks=",".join(roles) if blocks == "all" else blocks)
        try:
            gpam_options_from_args(ns, roles)
        except GPAMConfigError as e:
            raise RecipeError(f"grid cell {s.tag()}: {e} (from --lambda-pos/--lambda-neg/--lambda/--blocks)") from None
        settings.append(s)
    baselines = ([] if args.no_baseline else ["baseline"]) + list(args.controls)
    for b in baselines:
        if b not in matched_controls.BASELINES:
            raise RecipeError(f"--controls {b!r}: choose from {', '.join(matched_controls.CONTROLS)}")
    return settings + [GridSystem(b) for b in dict.fromkeys(baselines)]


def cell_environment(args, recipe_name, setting, seed, out) -> Dict[str, Optional[str]]:
    """The environment of one cell: the sweep's recipe variables, then the cell's own."""
    cell = {k: os.environ[k] for k in PASSED_ON if os.environ.get(k) not in (None, "")}
    if cell.get("DATA_DIR"):
        cell["DATA_DIR"] = os.path.abspath(cell["DATA_DIR"])
    extra = shlex.split(cell.get("EXTRA_ARGS", ""))
    if args.quick:
        recipe = registry.get(recipe_name)
        extra = shlex.split(QUICK_NMT if recipe.task == "translation" else QUICK_LM) + _quick_adaptive(args, recipe) + extra
        cell.setdefault("UPDATE_FREQ", "1")
        cell.setdefault("AVERAGE", "0")
        quick_eval = (["--max-len-a", "1", "--max-len-b", "5"] if recipe.task == "translation" else
                      ["--tokens-per-sample", "32", "--context-window", "16"] + (
                          ["--softmax-batch", "64"] if _adaptive(args, recipe) else []))
        cell["EVAL_ARGS"] = shlex.join(quick_eval + shlex.split(cell.get("EVAL_ARGS", "")))
    extra += shlex.split(args.extra_args)
    gpam = env_args("GPAM_ARGS") + shlex.split(args.gpam_args) + setting.gpam_args()
    cell.update(MODEL=setting.model, SEED=str(seed), EXTRA_ARGS=shlex.join(extra), GPAM_ARGS=shlex.join(gpam),
                RUNS_DIR=os.path.join(out, "runs"),
                SAVE_DIR=os.path.abspath(getattr(args, "checkpoints", None) or os.path.join(out, "checkpoints")), FORCE=None)
    if args.max_update:
        cell["MAX_UPDATE"] = str(args.max_update)
    elif args.quick and "MAX_UPDATE" not in cell:
        cell["MAX_UPDATE"] = str(QUICK_MAX_UPDATE)
    return cell


def _size(args, recipe):
    return os.environ.get("SIZE") or recipe.default_size


def _adaptive(args, recipe):
    return "adaptive_loss" in recipe.sizes[_size(args, recipe)].train


def _quick_adaptive(args, recipe):
    """Adaptive input/softmax cutoffs below the size of the data's dictionary (the official
    cutoffs need a vocabulary of 60,000 words at least)."""
    if not _adaptive(args, recipe):
        return []
    from gpam_fairseq.recipes.stages import Settings

    with controls.environment(MODEL="baseline"):
        dict_path = os.path.join(Settings(recipe).data_bin, "dict.txt")
    try:
        with open(dict_path, encoding="utf-8") as f:
            vocab = sum(1 for _ in f) + 4
    except OSError:
        raise RecipeError(f"{dict_path}: missing; run the recipe's prepare.py and preprocess.py first") from None
    cutoffs = f"{max(2, vocab // 3)},{max(3, 2 * vocab // 3)}"
    return ["--adaptive-input-cutoff", cutoffs, "--adaptive-softmax-cutoff", cutoffs]


def build_cells(args, recipe, out) -> List[Cell]:
    from gpam_fairseq.recipes.stages import Settings

    cells = []
    for setting in grid_settings(args, recipe):
        for seed in args.seeds:
            cell_env = cell_environment(args, recipe.name, setting, seed, out)
            # the recipe's run name with the setting's tag instead of the model
            with controls.environment(**{**cell_env, "MODEL": "baseline", "RUN_NAME": None}):
                default = Settings(recipe).run_name
            run_name = setting.tag() + default[len("baseline"):]
            cell_env["RUN_NAME"] = run_name
            with controls.environment(**cell_env):
                s = Settings(recipe)
                target = int(env("MAX_UPDATE", s.size.max_update))
            spec = {"recipe": recipe.name, "env": cell_env, "max_update": target, "run_name": run_name}
            cells.append(Cell(setting, seed, run_name, s.run_dir, s.save_dir, spec))
    return cells


# ----------------------------------------------------------------------------- one cell


def _recorded_max_update(run_dir) -> Optional[int]:
    try:
        with open(done_marker(run_dir, "train"), encoding="utf-8") as f:
            cmd = json.load(f).get("command") or []
    except (OSError, ValueError):
        return None
    value = last_flag(cmd, "--max-update")
    return int(value) if value is not None else None


def cell_status(run_dir, save_dir, target) -> str:
    """done | extend (trained to fewer updates than target) | resume (interrupted) | new."""
    trained = _recorded_max_update(run_dir)
    if trained is not None and trained < target:
        return "extend"
    if os.path.exists(done_marker(run_dir, "evaluate")) and trained is not None:
        return "done"
    if trained is not None:
        return "evaluate"  # trained, not evaluated
    if os.path.exists(os.path.join(save_dir, "checkpoint_last.pt")):
        return "resume"
    return "new"


def _status_text(cell: Cell) -> str:
    """What will be done with a cell, now (see :func:`cell_status`)."""
    from gpam_fairseq.recipes.stages import training_figures

    run_dir, target = cell.run_dir, cell.spec["max_update"]
    status = cell_status(run_dir, cell.save_dir, target)
    if status == "extend":
        return f"extend: trained to {_recorded_max_update(run_dir)} of {target} updates, goes on from checkpoint_last.pt"
    if status == "resume":
        done = training_figures(run_dir).get("num_updates") if os.path.isdir(run_dir) else None
        return f"resume from checkpoint_last.pt (interrupted{f' after update {done}' if done else ''})"
    return {"new": "new", "done": "done", "evaluate": "trained, evaluate only"}[status]


def run_cell(spec: Dict) -> Dict:
    """Run one cell through the recipe's train and evaluate stages (skipping what is done).
    spec: {"recipe", "env", "max_update", "run_name"} (see build_cells). Returns
    {"run_name", "status", "seconds", "result"} with the run.json contents."""
    from gpam_fairseq.recipes import stages

    start = time.time()
    with controls.environment(**spec["env"]):
        s = stages.Settings(registry.get(spec["recipe"]))
        status = cell_status(s.run_dir, s.save_dir, spec["max_update"])
        if status != "done":
            if status == "extend":  # train on from checkpoint_last.pt to the new --max-update
                for stage in ("train", "evaluate"):
                    if os.path.exists(done_marker(s.run_dir, stage)):
                        os.remove(done_marker(s.run_dir, stage))
            stages.stage_train(s, [])
            stages.stage_evaluate(s, [])
        with open(os.path.join(s.run_dir, "run.json"), encoding="utf-8") as f:
            result = json.load(f)
    return {"run_name": spec["run_name"], "status": "skipped" if status == "done" else status,
            "seconds": time.time() - start, "result": result}
