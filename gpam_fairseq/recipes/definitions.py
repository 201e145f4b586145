"""The five recipes: data, model sizes and the hyperparameters of fairseq's official recipes.

Each model size lists the stock fairseq architecture (MODEL=baseline) and our equally sized
one (MODEL=gpam, or MODEL=<any --attention-type value>); everything else on the command line
is shared, so baseline and daGPAM runs differ only in the attention. The controls
MODEL=baseline_params / baseline_maps are the stock architecture with flags computed from it
(gpam_fairseq/recipes/matched_controls.py).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

from gpam_fairseq.recipes import preparation as prep

ADAM = ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)"]
LABEL_SMOOTHED = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]


@dataclass
class Size:
    """One model size: stock and GPAM architectures plus the size's own training settings."""

    baseline: List[str]
    gpam: List[str]
    train: List[str]
    max_update: int
    gpu_steps: int  # GPU-steps per update in the official recipe: update-freq = gpu_steps / GPUs
    eval_args: List[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Recipe:
    name: str
    task: str  # "translation" or "language_modeling"
    prepare: Callable
    preprocess: Callable[..., List[str]]  # (prepared dir, setup) -> fairseq-preprocess arguments
    sizes: Dict[str, Size]
    default_size: str
    directions: Tuple[str, ...] = ()  # NMT: "src-tgt" values of DIRECTION, first = default
    setups: Tuple[str, ...] = ()  # data setups (SETUP), first = default
    average_checkpoints: int = 0  # evaluate on the average of the last N epoch checkpoints
    bleu_lowercase: bool = False  # the data is lowercased: score sacreBLEU/chrF lowercased
    compound_split_bleu: bool = False
    bits_per_char: bool = False
    generate_args: List[str] = field(default_factory=list)
    data_subdir: str = ""  # data/<name>/<data_subdir>/ (own_corpus: the direction or lm_<lang>)


# --- IWSLT14 ----------------------------------------------------------------------------------

def _iwslt14_preprocess(text_dir, setup=None):
    # fairseq's examples/translation/README.md; separate dictionaries. One data-bin serves
    # both directions: the translation task also finds train.de-en.* for -s en -t de.
    return ["--source-lang", "de", "--target-lang", "en", "--trainpref", f"{text_dir}/train",
            "--validpref", f"{text_dir}/valid", "--testpref", f"{text_dir}/test"]


IWSLT14 = Recipe(
    name="iwslt14", task="translation", prepare=prep.prepare_iwslt14, preprocess=_iwslt14_preprocess,
    directions=("de-en", "en-de"), bleu_lowercase=True,
    sizes={"base": Size(
        baseline=["--arch", "transformer_iwslt_de_en", "--share-decoder-input-output-embed"],
        gpam=["--arch", "transformer_gpam_iwslt_de_en", "--share-decoder-input-output-embed"],
        train=[*ADAM, "--clip-norm", "0.0", "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt",
               "--warmup-updates", "4000", "--dropout", "0.3", "--weight-decay", "0.0001", *LABEL_SMOOTHED,
               "--max-tokens", "4096"],
        max_update=50000, gpu_steps=1,
        note="fairseq's README sets no stopping point; 50,000 updates is about 45 epochs")},
    default_size="base",
    generate_args=["--beam", "5", "--batch-size", "128", "--remove-bpe"],
)

# --- WMT14 En-De ------------------------------------------------------------------------------

def _wmt_preprocess(text_dir, setup=None):
    # a joined dictionary for --share-all-embeddings: scaling_nmt's setting, and with the icml17
    # data too (its BPE is joint as well; fairseq's conv recipe keeps all words, thresholds 0)
    args = ["--source-lang", "en", "--target-lang", "de", "--trainpref", f"{text_dir}/train",
            "--validpref", f"{text_dir}/valid", "--testpref", f"{text_dir}/test", "--joined-dictionary"]
    if setup == "scaling_nmt":
        args += ["--nwordssrc", "32768", "--nwordstgt", "32768"]
    return args


_SCALING_NMT = [*ADAM, "--clip-norm", "0.0", "--lr", "0.0005", "--lr-scheduler", "inverse_sqrt",
                "--warmup-updates", "4000", "--warmup-init-lr", "1e-07", "--weight-decay", "0.0",
                *LABEL_SMOOTHED, "--max-tokens", "3584"]

WMT14 = Recipe(
    name="wmt14_en_de", task="translation", preprocess=_wmt_preprocess, directions=("en-de",),
    prepare=None,  # chosen by SETUP, see prepare_for()
    setups=("icml17", "scaling_nmt"), average_checkpoints=10, compound_split_bleu=True,
    sizes={
        "big": Size(
            baseline=["--arch", "transformer_vaswani_wmt_en_de_big", "--share-all-embeddings"],
            gpam=["--arch", "transformer_gpam_vaswani_wmt_en_de_big", "--share-all-embeddings"],
            train=[*_SCALING_NMT, "--dropout", "0.3"], max_update=30000, gpu_steps=128,
            note="scaling_nmt: 3584 tokens x 128 GPU-steps per update; the recipe sets no stopping "
                 "point, 30,000 updates is our choice"),
        "base": Size(
            baseline=["--arch", "transformer_wmt_en_de", "--share-all-embeddings"],
            gpam=["--arch", "transformer_gpam_wmt_en_de", "--share-all-embeddings"],
            train=[*_SCALING_NMT, "--dropout", "0.1"], max_update=100000, gpu_steps=8,
            note="the paper's size (0.12 % extra parameters); scaling_nmt's optimiser, Vaswani et al.'s "
                 "base dropout 0.1, about 25k tokens per update (3584 x 8), 100k updates"),
    },
    default_size="base",
    generate_args=["--beam", "4", "--lenpen", "0.6", "--batch-size", "128", "--remove-bpe"],
)


def prepare_for(recipe, setup):
    if recipe is WMT14:
        return prep.prepare_wmt14_icml17 if setup == "icml17" else prep.prepare_wmt16_scaling_nmt
    return recipe.prepare


# --- language models --------------------------------------------------------------------------

def _lm_preprocess(text_dir, setup=None):
    return ["--only-source", "--trainpref", f"{text_dir}/train.txt", "--validpref", f"{text_dir}/valid.txt",
            "--testpref", f"{text_dir}/test.txt"]


_ADAPTIVE_INPUTS = [  # examples/language_model/README.adaptive_inputs.md
    "--lr", "1.0", "--t-mult", "2", "--lr-period-updates", "270000", "--lr-scheduler", "cosine",
    "--lr-shrink", "0.75", "--warmup-updates", "16000", "--warmup-init-lr", "1e-07", "--stop-min-lr", "1e-09",
    "--optimizer", "nag", "--min-lr", "0.0001", "--clip-norm", "0.1", "--criterion", "adaptive_loss",
    "--max-tokens", "3072", "--tokens-per-sample", "3072", "--sample-break-mode", "none",
    "--skip-invalid-size-inputs-valid-test", "--ddp-backend", "legacy_ddp"]
_ADAPTIVE_EVAL = ["--batch-size", "2", "--tokens-per-sample", "3072", "--context-window", "2560",
                  "--softmax-batch", "1024"]
_TRANSFORMER_LM = [  # examples/language_model/README.md
    *ADAM, "--weight-decay", "0.01", "--clip-norm", "0.0", "--lr", "0.0005", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "4000", "--warmup-init-lr", "1e-07", "--dropout", "0.1",
    "--tokens-per-sample", "512", "--sample-break-mode", "none", "--max-tokens", "2048"]
_LM_EVAL = ["--batch-size", "2", "--tokens-per-sample", "512", "--context-window", "400"]

WIKITEXT103 = Recipe(
    name="wikitext103", task="language_modeling", prepare=prep.prepare_wikitext103, preprocess=_lm_preprocess,
    sizes={
        "8layer": Size(
            baseline=["--arch", "transformer_lm_wiki103", "--decoder-layers", "8"],
            gpam=["--arch", "transformer_lm_gpam_wiki103_8layer"],
            train=_ADAPTIVE_INPUTS, max_update=286000, gpu_steps=24, eval_args=_ADAPTIVE_EVAL,
            note="the paper's 8-layer model; adaptive inputs (Pre-LN, d=1024), the schedule of "
                 "README.adaptive_inputs.md (8 GPUs x update-freq 3)"),
        "16layer": Size(
            baseline=["--arch", "transformer_lm_wiki103"], gpam=["--arch", "transformer_lm_gpam_wiki103"],
            train=_ADAPTIVE_INPUTS, max_update=286000, gpu_steps=24, eval_args=_ADAPTIVE_EVAL,
            note="Baevski & Auli's adaptive-input model, fairseq's 18.7 perplexity"),
        "base": Size(
            baseline=["--arch", "transformer_lm", "--share-decoder-input-output-embed"],
            gpam=["--arch", "transformer_lm_gpam", "--share-decoder-input-output-embed"],
            train=_TRANSFORMER_LM, max_update=50000, gpu_steps=16, eval_args=_LM_EVAL,
            note="fairseq's transformer_lm README recipe (Post-LN, 6 layers, d=512)"),
    },
    default_size="8layer",
)

ENWIK8 = Recipe(
    name="enwik8", task="language_modeling", prepare=prep.prepare_enwik8, preprocess=_lm_preprocess,
    bits_per_char=True,
    sizes={"12layer": Size(
        baseline=["--arch", "transformer_lm_big", "--decoder-embed-dim", "512", "--decoder-ffn-embed-dim", "2048",
                  "--decoder-attention-heads", "8"],
        gpam=["--arch", "transformer_lm_gpam_enwik8"],
        train=[*ADAM, "--weight-decay", "0.01", "--clip-norm", "0.25", "--lr", "0.0005", "--lr-scheduler",
               "inverse_sqrt", "--warmup-updates", "4000", "--warmup-init-lr", "1e-07", "--dropout", "0.1",
               "--tokens-per-sample", "512", "--sample-break-mode", "none", "--max-tokens", "11264"],
        max_update=400000, gpu_steps=1,
        eval_args=["--batch-size", "4", "--tokens-per-sample", "512", "--context-window", "448"],
        note="fairseq has no Enwik8 recipe: 12 layers, d=512, 8 heads, Pre-LN, batches of 22 x 512 "
             "bytes and 400k updates as Transformer-XL's base Enwik8 model, fairseq's LM optimiser")},
    default_size="12layer",
)

PTB = Recipe(
    name="ptb", task="language_modeling", prepare=prep.prepare_ptb, preprocess=_lm_preprocess,
    sizes={"15layer": Size(
        baseline=["--arch", "transformer_lm_big", "--decoder-layers", "15", "--decoder-embed-dim", "384",
                  "--decoder-ffn-embed-dim", "1536", "--decoder-attention-heads", "6", "--dropout", "0.3",
                  "--share-decoder-input-output-embed"],
        gpam=["--arch", "transformer_lm_gpam_ptb"],
        train=[*ADAM, "--weight-decay", "0.01", "--clip-norm", "0.0", "--lr", "0.0005", "--lr-scheduler",
               "inverse_sqrt", "--warmup-updates", "4000", "--warmup-init-lr", "1e-07",
               "--tokens-per-sample", "256", "--sample-break-mode", "none", "--max-tokens", "4096",
               "--patience", "10"],
        max_update=15000, gpu_steps=1,
        eval_args=["--batch-size", "8", "--tokens-per-sample", "256", "--context-window", "192"],
        note="the paper's 15-layer PTB model (its width is not in our notes: d=384, 6 heads, Pre-LN); "
             "fairseq's transformer_lm optimiser, early stop after 10 epochs without improvement")},
    default_size="15layer",
)

RECIPES = {r.name: r for r in (IWSLT14, WMT14, WIKITEXT103, ENWIK8, PTB)}
