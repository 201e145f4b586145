"""The four stages of a recipe; examples/<task>/{prepare,preprocess,train,evaluate}.py call main().

Settings come from environment variables, so that one command line serves every system:

    MODEL=baseline|baseline_params|baseline_maps|gpam|<any --attention-type value>   (default gpam)
    SEED=1   SIZE=<recipe's sizes>   SETUP=<data setup>   DIRECTION=src-tgt   LN=post|pre (NMT)
    DATA_DIR, SAVE_DIR, RUNS_DIR     where data, checkpoints and run folders go
    MAX_UPDATE, EXTRA_ARGS           override the update count; extra fairseq-train arguments (last, so they win)
    GPAM_ARGS                        daGPAM flags (--gpam-*) for MODEL=gpam and the other attention types, last;
                                     MODEL=baseline_params matches their parameters; baseline(_maps) ignore them
    EVAL_ARGS                        extra fairseq-generate / fairseq-eval-lm arguments
    NGPUS, UPDATE_FREQ, AVERAGE=N, WORKERS, FORCE=1 (redo a finished stage)
    PRECISION=fp32|fp16|bf16|amp     training (and decoding: bf16/fp16; amp decodes in fp32) precision; default bf16
                                     on GPUs with bf16 arithmetic, fp16 on older GPUs, fp32 on the CPU (FP16=1|0 = fp16|fp32)
    DOWNLOAD_RETRIES=4, DOWNLOAD_BACKOFF_S=2, DOWNLOAD_TIMEOUT_S=60, DOWNLOAD_USER_AGENT, DOWNLOAD_PROGRESS=1
                                     the prepare stage's downloads (attempts per source, first wait, read timeout)
"""

import argparse
import glob
import json
import os
import re
import shutil
import sys

from gpam_fairseq.fairseq_glue.tools import (REPO_ROOT, USER_DIR, fairseq_cli, log_records, parse_training_log,
                                         read_eval_lm_output, read_generate_output, say)
from gpam_fairseq.recipes import matched_controls  # below stages (controls.py imports stages)
from gpam_fairseq.recipes.common import (RecipeError, env, env_args, env_int, has_finished, is_done, last_flag, mark_done,
                                         run_cli, training_progress)
from gpam_fairseq.recipes import own_corpus, registry
from gpam_fairseq.recipes.definitions import prepare_for

ENV_HELP = __doc__.split("\n\n", 1)[1]


class Settings:
    """Every path and choice of one invocation, from the environment (see ENV_HELP)."""

    def __init__(self, recipe):
        self.recipe = recipe
        r = recipe
        self.setup = self._choice("SETUP", r.setups) if r.setups else None
        self.size_name = self._choice("SIZE", tuple(r.sizes), default=r.default_size)
        self.size = r.sizes[self.size_name]
        self.direction = self._choice("DIRECTION", r.directions) if r.directions else None
        self.ln = self._choice("LN", ("post", "pre")) if r.task == "translation" else None
        self.model = env("MODEL", "gpam")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.model):
            raise RecipeError(f"MODEL={self.model!r}: use {', '.join(matched_controls.BASELINES)}, gpam or an --attention-type value")
        self.seed = env_int("SEED", 1)
        sub = [r.name] + ([self.setup] if self.setup else []) + ([r.data_subdir] if r.data_subdir else [])
        self.data_dir = os.path.abspath(env("DATA_DIR", os.path.join(REPO_ROOT, "data", *sub)))
        self.prepared = os.path.join(self.data_dir, "prepared")
        self.data_bin = os.path.join(self.data_dir, "data-bin")
        parts = [self.model, self.size_name] + ([self.direction] if len(r.directions) > 1 else [])
        parts += [f"{self.ln}ln"] if self.ln else []
        self.run_name = env("RUN_NAME", "_".join(parts + [f"seed{self.seed}"]))
        self.save_dir = os.path.join(os.path.abspath(env("SAVE_DIR", os.path.join(REPO_ROOT, "checkpoints", *sub))), self.run_name)
        self.run_dir = os.path.join(os.path.abspath(env("RUNS_DIR", os.path.join(REPO_ROOT, "runs", *sub))), self.run_name)

    @staticmethod
    def _choice(name, allowed, default=None):
        value = env(name, default or allowed[0])
        if value not in allowed:
            raise RecipeError(f"{name}={value!r}: choose from {', '.join(allowed)}")
        return value

    @property
    def is_baseline(self):
        """The stock fairseq architecture: MODEL=baseline and its matched controls."""
        return self.model in matched_controls.BASELINES

    @property
    def attention_type(self):
        return "softmax" if self.is_baseline else ("dagpam" if self.model == "gpam" else self.model)

    def model_args(self, model=None):
        model = model or self.model
        if model in matched_controls.BASELINES:
            return list(self.size.baseline)  # the stock fairseq architecture
        attention = "dagpam" if model == "gpam" else model
        return [*self.size.gpam, "--attention-type", attention]

    def lang_args(self):
        if not self.direction:
            return []
        src, tgt = self.direction.split("-")
        return ["--source-lang", src, "--target-lang", tgt]


PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "amp": ["--amp"]}
DECODING_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "amp": []}  # fairseq decodes without amp


def precision(gpus):
    """PRECISION, else the older FP16=1|0, else bf16 on a GPU with bf16 arithmetic (A100, H100...),
    fp16 on an older GPU, fp32 on the CPU."""
    value = env("PRECISION")
    if value is not None:
        if value not in PRECISION_FLAGS:
            raise RecipeError(f"PRECISION={value}: choose one of {', '.join(PRECISION_FLAGS)}")
        return value
    legacy = env("FP16", "auto")
    if legacy in ("0", "1"):
        return "fp16" if legacy == "1" else "fp32"
    if gpus == 0:
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def _gpus():
    n = env_int("NGPUS", None)
    if n is None:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n


# --- stages -----------------------------------------------------------------------------------

def stage_prepare(s, argv):
    if s.recipe.name == own_corpus.NAME:  # the user's own files: no downloads
        return own_corpus.stage_prepare(s, argv)
    p = argparse.ArgumentParser(prog=f"{s.recipe.name}/prepare.py", description="download and tokenise the data")
    p.add_argument("--archive", action="append", default=[], metavar="PATH",
                   help="an already-downloaded source archive (repeat for several); used instead of downloading")
    p.add_argument("--raw-dir", metavar="DIR", help="a folder holding the downloaded source files under their usual names")
    p.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="try URL/<file> before the built-in sources (repeat for several; a lab's cache or mirror)")
    p.add_argument("--only-mirrors", action="store_true",
                   help="download from the --mirror URLs only, never from the built-in sources (an air-gapped cluster)")
    p.add_argument("--list-sources", action="store_true",
                   help="print what would be downloaded (file, size, checksum, sources) and exit")
    p.add_argument("--json", action="store_true", help="with --list-sources: a JSON list of {file, size, sha256|sha1|md5, urls}")
    p.add_argument("--no-verify", action="store_true",
                   help="use files whose size or checksum differ from the published ones (provenance marks them unverified)")
    args = p.parse_args(argv)
    from gpam_fairseq.recipes import sources as recipe_sources

    if args.list_sources:
        from gpam_fairseq.recipes.downloads import TrustStore

        files = recipe_sources.downloads(s.recipe.name, s.setup)
        trust = TrustStore(os.path.join(s.data_dir, "orig"))  # sha256 recorded on first use, where there is one
        print(json.dumps([f.as_json(trust) for f in files], indent=1) if args.json else recipe_sources.table(files, trust))
        return
    if args.json:
        raise RecipeError("--json: only with --list-sources")
    if is_done(s.prepared, "prepare"):
        say(f"[prepare] already done: {s.prepared} (FORCE=1 redoes it)")
        return
    from gpam_fairseq.recipes.preparation import Sources

    say(f"[prepare] {s.recipe.name}{' (' + s.setup + ')' if s.setup else ''} -> {s.prepared}")
    sources = Sources(os.path.join(s.data_dir, "orig"), args.archive, args.raw_dir, args.mirror,
                      verify=not args.no_verify, only_mirrors=args.only_mirrors)
    prepare_for(s.recipe, s.setup)(s.data_dir, sources)
    provenance = sources.write_provenance(s.prepared, recipe=s.recipe.name, setup=s.setup)
    mark_done(s.prepared, "prepare")
    say(f"[prepare] done: {s.prepared} (what was used: {provenance})")


def stage_preprocess(s, argv):
    argparse.ArgumentParser(prog=f"{s.recipe.name}/preprocess.py", description="fairseq-preprocess").parse_args(argv)
    if is_done(s.data_bin, "preprocess"):
        say(f"[preprocess] already done: {s.data_bin}")
        return
    if not has_finished(s.prepared, "prepare"):
        raise RecipeError(f"{s.prepared} is not prepared: run {s.recipe.name}/prepare.py first (same DATA_DIR/SETUP)")
    say(f"[preprocess] fairseq-preprocess -> {s.data_bin}")
    from gpam_fairseq.recipes.text import check_preprocess_inputs

    check_preprocess_inputs(s.recipe.preprocess(s.prepared, s.setup))  # both sides of each split line up
    run_cli("fairseq-preprocess",
            [fairseq_cli("fairseq-preprocess"), *s.recipe.preprocess(s.prepared, s.setup), "--destdir", s.data_bin,
             "--workers", str(max(1, env_int("WORKERS", os.cpu_count() or 1)))],
            os.path.join(s.data_dir, "preprocess.log"))
    mark_done(s.data_bin, "preprocess")
    say(f"[preprocess] done: {s.data_bin}")


def train_command(s, with_info=False):
    """fairseq-train's command line for the settings (and, with_info, what a control changed)."""
    size = s.size
    gpus = _gpus()
    update_freq = env_int("UPDATE_FREQ", max(1, size.gpu_steps // max(gpus, 1)))

    def command(model):
        cmd = [fairseq_cli("fairseq-train"), s.data_bin, "--user-dir", USER_DIR, "--task", s.recipe.task,
               *s.lang_args(), *s.model_args(model), *size.train]
        if s.ln == "pre":
            cmd += ["--encoder-normalize-before", "--decoder-normalize-before"]
        cmd += PRECISION_FLAGS[precision(gpus)]
        cmd += ["--update-freq", str(update_freq), "--seed", str(s.seed),
                "--max-update", str(env_int("MAX_UPDATE", size.max_update)),
                "--save-dir", s.save_dir, "--tensorboard-logdir", os.path.join(s.run_dir, "tensorboard"),
                "--log-format", "json", "--log-interval", "100", *env_args("EXTRA_ARGS")]
        if model not in matched_controls.BASELINES:
            cmd += env_args("GPAM_ARGS")
        return cmd

    cmd, info = command(s.model), None
    if s.model in matched_controls.CONTROLS:
        # computed from the full command lines (EXTRA_ARGS and GPAM_ARGS included), appended last
        try:
            flags, info = matched_controls.control_flags(s.model, cmd[2:], command("gpam")[2:], s.recipe.task)
        except matched_controls.ControlError as e:
            raise RecipeError(str(e)) from None
        cmd += flags
    return (cmd, gpus, update_freq, info) if with_info else (cmd, gpus, update_freq)


def stage_train(s, argv):
    argparse.ArgumentParser(prog=f"{s.recipe.name}/train.py", description="fairseq-train one system").parse_args(argv)
    if is_done(s.run_dir, "train"):
        say(f"[train] already done: {s.run_dir} (FORCE=1 trains again, resuming from checkpoint_last.pt)")
        return
    if not has_finished(s.data_bin, "preprocess"):
        raise RecipeError(f"{s.data_bin} is not binarised: run {s.recipe.name}/preprocess.py first")
    cmd, gpus, update_freq, control = train_command(s, with_info=True)
    say(f"[train] {s.run_name}: MODEL={s.model} (attention {s.attention_type}), size {s.size_name}, seed {s.seed}")
    if control:
        say(f"  {s.model}: {matched_controls.describe(s.model, control)}")
    say(f"  effective batch: {s.size.gpu_steps} GPU-steps per update in the official recipe; {max(gpus, 1)} "
        f"{'GPU' if gpus else 'CPU process'}(s) x --update-freq {update_freq} = {max(gpus, 1) * update_freq}")
    os.makedirs(s.run_dir, exist_ok=True)
    record_data_provenance(s)
    log = os.path.join(s.run_dir, "train.log")
    if os.path.exists(log):  # a resumed run: keep the earlier log, fairseq resumes from checkpoint_last.pt
        os.replace(log, os.path.join(s.run_dir, f"train.{len(glob.glob(os.path.join(s.run_dir, 'train.*.log')))}.log"))
    run_cli("fairseq-train", cmd, log, echo=training_progress(s.run_name))
    mark_done(s.run_dir, "train", {"command": cmd[1:], **({"control": control} if control else {})})
    say(f"[train] done: checkpoints in {s.save_dir}, logs and tensorboard in {s.run_dir}")


DATA_PROVENANCE = "data_provenance.json"


def record_data_provenance(s):
    """The prepared data's provenance (file names, sizes, sha256 of the sources used), copied into
    the run folder: which bytes a run trained on stays with the run."""
    src = os.path.join(s.prepared, "provenance.json")
    if os.path.exists(src):
        shutil.copyfile(src, os.path.join(s.run_dir, DATA_PROVENANCE))


def read_data_provenance(run_dir):
    path = os.path.join(run_dir, DATA_PROVENANCE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def training_figures(run_dir):
    """Parameters (fairseq's count), median training words/s and the last update from the
    train logs (several when the run was resumed)."""
    texts = []
    for path in sorted(glob.glob(os.path.join(run_dir, "train*.log"))):
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    text = "\n".join(texts)
    figures = parse_training_log(text)
    lines = text.splitlines()
    updates = [int(r["num_updates"]) for r in log_records(lines, "train_inner")] + [
        int(r["train_num_updates"]) for r in log_records(lines, "train")]
    return {"params": figures["params"], "train_wps": figures["wps"], "num_updates": max(updates) if updates else None}


def _checkpoint(s):
    n = env_int("AVERAGE", s.recipe.average_checkpoints)
    best = os.path.join(s.save_dir, "checkpoint_best.pt")
    if n <= 1:
        return best, "checkpoint_best.pt"
    epochs = glob.glob(os.path.join(s.save_dir, "checkpoint[0-9]*.pt"))
    if len(epochs) < 2:
        say(f"  AVERAGE={n}, but {s.save_dir} holds {len(epochs)} epoch checkpoint(s): using checkpoint_best.pt")
        return best, "checkpoint_best.pt"
    n = min(n, len(epochs))
    out = os.path.join(s.save_dir, f"checkpoint.avg{n}.pt")
    from gpam_fairseq.checkpointing.averaging import CheckpointAveragingError, average_and_save, last_n_checkpoints

    try:
        average_and_save(last_n_checkpoints(s.save_dir, n, update_based=False), out)
    except CheckpointAveragingError as err:
        raise RecipeError(f"AVERAGE={n}: {err}") from None
    return out, f"average of the last {n} epoch checkpoints"


def compound_split(line):
    """scaling_nmt's compound_split_bleu.sh: a-b -> a ##AT##-##AT## b."""
    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", line)


def measured(script):
    """The command running a fairseq console script through gpam_fairseq.measurement.peak_memory, which
    reports the device and the peak memory after fairseq's own last lines."""
    return [sys.executable, "-m", "gpam_fairseq.measurement.peak_memory", script]


def _number(text):
    return float(text.replace(",", ""))


def inference_figures(tool, cmd, log, log_path):
    """Decoding speed as fairseq reports it in its last lines, the batch settings passed, the
    device, and the peak memory (CUDA allocator's peak on a GPU; the process's peak RSS always)."""
    from gpam_fairseq.measurement import peak_memory

    out = {"tool": tool, "batch_size": last_flag(cmd, "--batch-size", "--max-sentences"),
           "max_tokens": last_flag(cmd, "--max-tokens")}
    out = {k: (int(v) if k != "tool" and v is not None else v) for k, v in out.items()}
    if tool == "fairseq-generate":
        out["beam"] = int(last_flag(cmd, "--beam") or 5)  # fairseq's default beam: 5
        m = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
                      r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", log)
        if not m:
            raise RecipeError(f"no 'Translated N sentences (M tokens) in ...' line in {log_path}")
        out.update(sentences=int(_number(m.group(1))), tokens=int(_number(m.group(2))), seconds=float(m.group(3)),
                   sentences_per_s=float(m.group(4)), tokens_per_s=float(m.group(5)))
    else:
        for flag in ("--tokens-per-sample", "--context-window"):
            value = last_flag(cmd, flag)
            out[flag[2:].replace("-", "_")] = int(value) if value is not None else None
        m = re.search(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)", log)
        if not m:
            raise RecipeError(f"no 'Evaluated N tokens in ...' line in {log_path}")
        out.update(tokens=int(_number(m.group(1))), seconds=float(m.group(2)), tokens_per_s=float(m.group(3)))
    figures = peak_memory.parse(log)
    if figures is None:
        raise RecipeError(f"no '{peak_memory.MARKER.strip()}' line in {log_path}")
    on_gpu = figures["cuda_max_memory_allocated"] is not None
    out.update(device=figures["device"],
               peak_gpu_memory_bytes=figures["cuda_max_memory_allocated"],
               peak_gpu_memory_reserved_bytes=figures["cuda_max_memory_reserved"],
               peak_gpu_memory=("torch.cuda.max_memory_allocated of the process" if on_gpu else "n/a (CPU)"),
               peak_rss_bytes=figures["max_rss_bytes"],
               peak_rss="peak resident set size of the process (CPU memory; getrusage)")
    return out


def test_set_size(s):
    """Sentences (translation) or tokens, end-of-line symbols included (language modelling), of the
    binarised test set, read from data-bin: what the evaluation must have scored."""
    from fairseq.data import indexed_dataset

    from gpam_fairseq.fairseq_glue.evaluation import subset_size

    try:
        if s.recipe.task == "translation":
            return subset_size(s.data_bin, "test", lang=s.direction.split("-")[0])
        prefix = os.path.join(s.data_bin, "test")
        impl = indexed_dataset.infer_dataset_impl(prefix)
        if impl is None:
            raise FileNotFoundError(prefix)
        dataset = indexed_dataset.make_dataset(prefix, impl)  # kept alive: its sizes are a view of its mmap
        return int(dataset.sizes.sum())
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(f"{s.data_bin}: cannot count the test set ({e}): run {s.recipe.name}/preprocess.py again "
                          f"(same DATA_DIR)") from None


def check_all_scored(s, scored, what, log_path):
    """Every test sentence (token) scored, or one line naming the log: fairseq drops the last
    partial batch of an evaluation when its size is not a multiple of --required-batch-size-multiple."""
    expected = test_set_size(s)
    say(f"  scored {scored:,} of {expected:,} test {what}")
    if scored != expected:
        raise RecipeError(f"scored {scored:,} of the {expected:,} test {what} ({log_path}): the evaluation lost some; "
                          f"check EVAL_ARGS (--required-batch-size-multiple, --skip-invalid-size-inputs-valid-test, "
                          f"--max-len-a/b) and rerun with FORCE=1")
    return expected


def evaluate_translation(s, ckpt, result):
    from sacrebleu.metrics import BLEU, CHRF

    from gpam_fairseq.recipes import text

    cmd = [*measured("fairseq-generate"), s.data_bin, "--user-dir", USER_DIR, "--task", "translation",
           *s.lang_args(), "--path", ckpt, "--gen-subset", "test", *s.recipe.generate_args,
           "--required-batch-size-multiple", "1", *DECODING_FLAGS[precision(_gpus())], *env_args("EVAL_ARGS")]
    log_path = os.path.join(s.run_dir, "generate.log")
    log = run_cli("fairseq-generate", cmd, log_path)
    result["inference"] = inference_figures("fairseq-generate", cmd, log, log_path)
    hyps_tok, refs_tok = read_generate_output(log)
    result["test_sentences"] = check_all_scored(s, len(hyps_tok), "sentences", log_path)
    tgt = s.direction.split("-")[1]
    hyps = text.moses_detokenize(hyps_tok, tgt)
    raw_ref = os.path.join(s.prepared, f"test.raw.{tgt}")
    refs = None
    if os.path.exists(raw_ref):
        with open(raw_ref, encoding="utf-8") as f:
            refs = [line.rstrip("\n") for line in f]
        if len(refs) != len(hyps):
            say(f"  {raw_ref} has {len(refs)} lines for {len(hyps)} hypotheses: scoring detokenised references instead")
            refs = None
    result["references"] = "untokenised test set" if refs else "detokenised fairseq references"
    refs = refs or text.moses_detokenize(refs_tok, tgt)
    lc = s.recipe.bleu_lowercase
    bleu, chrf = BLEU(lowercase=lc), CHRF(lowercase=lc)
    result.update(bleu=bleu.corpus_score(hyps, [refs]).score, bleu_signature=str(bleu.get_signature()),
                  chrf=chrf.corpus_score(hyps, [refs]).score, chrf_signature=str(chrf.get_signature()),
                  bleu_lowercase=lc, sentences=len(hyps))
    m = re.search(r"BLEU4? = ([\d.]+)", log)
    result["bleu_tokenized"] = float(m.group(1)) if m else None  # fairseq-generate's own score
    if s.recipe.compound_split_bleu:
        plain = BLEU(tokenize="none", smooth_method="none", force=True)
        result["bleu_compound_split"] = plain.corpus_score([compound_split(h) for h in hyps_tok],
                                                           [[compound_split(r) for r in refs_tok]]).score
    for name, lines in (("hyps.txt", hyps), ("refs.txt", refs), ("hyps.tok.txt", hyps_tok)):
        with open(os.path.join(s.run_dir, name), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    result["files"] = {"hyps": "hyps.txt", "refs": "refs.txt"}


def lm_eval_args(size_args, train_command):
    """The size's fairseq-eval-lm arguments, with blocks no longer than the model was trained on:
    when EXTRA_ARGS trained on shorter --tokens-per-sample, fairseq-eval-lm would skip every longer
    block ("samples have invalid sizes") instead of scoring it."""
    trained, wanted = last_flag(train_command or [], "--tokens-per-sample"), last_flag(size_args, "--tokens-per-sample")
    if trained is None or wanted is None or int(trained) >= int(wanted):
        return list(size_args)
    return [*size_args, "--tokens-per-sample", trained, "--context-window", str(int(trained) * 3 // 4)]


def evaluate_language_model(s, ckpt, result):
    eval_args = lm_eval_args(s.size.eval_args, result.get("train_command"))
    cmd = [*measured("fairseq-eval-lm"), s.data_bin, "--user-dir", USER_DIR, "--path", ckpt,
           "--gen-subset", "test", *eval_args, *DECODING_FLAGS[precision(_gpus())], *env_args("EVAL_ARGS")]
    log_path = os.path.join(s.run_dir, "eval_lm.log")
    log = run_cli("fairseq-eval-lm", cmd, log_path)
    result["inference"] = inference_figures("fairseq-eval-lm", cmd, log, log_path)
    loss_base2, perplexity = read_eval_lm_output(log)
    if loss_base2 is None:
        raise RecipeError(f"no 'Loss (base 2): ..., Perplexity: ...' line in {os.path.join(s.run_dir, 'eval_lm.log')}")
    result.update(loss_base2=loss_base2, perplexity=perplexity)
    result["test_tokens"] = check_all_scored(s, result["inference"]["tokens"], "tokens", log_path)
    if s.recipe.bits_per_char:  # one token per byte, eos = newline: base-2 loss = bits per character
        result["bpc"] = loss_base2


def stage_evaluate(s, argv):
    argparse.ArgumentParser(prog=f"{s.recipe.name}/evaluate.py", description="score the test set").parse_args(argv)
    if is_done(s.run_dir, "evaluate"):
        say(f"[evaluate] already done: {os.path.join(s.run_dir, 'run.json')}")
        return
    if not has_finished(s.run_dir, "train"):
        raise RecipeError(f"{s.run_name} is not trained: run {s.recipe.name}/train.py first (same MODEL/SEED/SIZE)")
    ckpt, ckpt_desc = _checkpoint(s)
    say(f"[evaluate] {s.run_name}: {ckpt_desc}")
    with open(os.path.join(s.run_dir, ".train.done"), encoding="utf-8") as f:
        train_info = json.load(f)
    result = {"recipe": s.recipe.name, "task": s.recipe.task, "system": s.run_name,
              "group": re.sub(r"_seed\d+$", "", s.run_name), "model": s.model,
              "attention_type": s.attention_type, "size": s.size_name, "seed": s.seed, "setup": s.setup,
              "direction": s.direction, "layer_norm": s.ln, "checkpoint": ckpt_desc,
              "train_command": train_info.get("command"), **training_figures(s.run_dir)}
    if train_info.get("control"):
        result["control"] = train_info["control"]
    result["data_provenance"] = read_data_provenance(s.run_dir)
    result["decoding_precision"] = precision(_gpus())  # the training precision is in train_command
    if s.recipe.task == "translation":
        evaluate_translation(s, ckpt, result)
    else:
        evaluate_language_model(s, ckpt, result)
    with open(os.path.join(s.run_dir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    mark_done(s.run_dir, "evaluate")
    shown = {k: result.get(k) for k in ("bleu", "chrf", "bleu_tokenized", "bleu_compound_split", "perplexity", "bpc")
             if result.get(k) is not None}
    say(f"[evaluate] {s.run_name}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
    inf = result["inference"]
    speed = (f"{inf['sentences_per_s']:,.1f} sentences/s, " if "sentences_per_s" in inf else "") + f"{inf['tokens_per_s']:,.1f} tokens/s"
    gpu = (f"{inf['peak_gpu_memory_bytes'] / 2**20:,.0f} MiB" if inf["peak_gpu_memory_bytes"] is not None
           else inf["peak_gpu_memory"])
    say(f"  {inf['tool']} on {inf['device']}: {speed}; peak GPU memory {gpu}; peak RSS {inf['peak_rss_bytes'] / 2**20:,.0f} MiB")
    if "bleu_signature" in result:
        say(f"  sacreBLEU signature: {result['bleu_signature']}")
    say(f"  run folder: {s.run_dir}  (compare: python scripts/compare_runs.py --baseline RUN_DIR RUN_DIR ...)")


def main(recipe_name, stage, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if any(a in ("-h", "--help") for a in argv):
            shown = registry.get(recipe_name, strict=False)
            say(f"{recipe_name} stage '{stage}'. Settings come from the environment:\n{ENV_HELP}")
            if recipe_name == own_corpus.NAME:
                say(own_corpus.__doc__.split("\n\n", 1)[1].split("\n\nThe steps", 1)[0])
            say(f"sizes: {', '.join(shown.sizes)}" + (f"; setups: {', '.join(shown.setups)}" if shown.setups else ""))
        settings = Settings(registry.get(recipe_name))
        {"prepare": stage_prepare, "preprocess": stage_preprocess, "train": stage_train,
         "evaluate": stage_evaluate}[stage](settings, argv)
    except RecipeError as e:  # one line, exit status 2, like fairseq's own usage errors
        print(f"{recipe_name}/{stage}: {e}", file=sys.stderr)
        sys.exit(2)
