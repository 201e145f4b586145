"""The own_corpus recipe: your own text through the same four stages as the published recipes.

Settings (environment, besides the recipes' common ones in stages.py):

    TASK=translation|lm      SRC, TGT (translation: both, different; lm: SRC is the text's language, default en)
    SIZE=tiny|small|iwslt|wmt_base (translation), tiny|small|base (lm)
    BPE_SIZE=10000           merges of the joint BPE (translation; lm with UNITS=bpe)
    LOWERCASE=0|1            lowercase after tokenisation (BLEU and chrF are then scored lowercased)
    UNITS=bpe|word           lm only: BPE, or whole words with rare ones (< WORD_MIN_COUNT=3 in train) as <unk>

Inputs of prepare.py (one kind per call):

    translation   --raw-dir DIR   train.SRC/train.TGT [+ valid.*, test.*]: one sentence per line, aligned
                  --tsv FILE      one pair per line, SRC<TAB>TGT (--tsv-order tgt-src for the other order)
                  --catalogs P..  gettext catalogs (.po/.mo files, or folders searched for them): msgid is
                                  English (--msgid-lang), msgstr the catalog's language; SRC/TGT pick the direction
    lm            --raw-dir DIR   train.txt [+ valid.txt, test.txt]
                  --text P..      text files, or folders of .txt/.rst/.md files (one document each)

The steps (translation): whitespace normalised; pairs with an empty or letterless side dropped;
exact duplicate pairs dropped; Moses tokenisation per language (sacremoses); optional
lowercasing; pairs longer than --max-len tokens or with a length ratio above --len-ratio dropped
(in train; in valid and test too when this stage makes the split); the split, where none was
given (--valid-fraction, --test-fraction, --split-seed); valid and test pairs whose source
sentence also occurs in train dropped (the count is reported); joint BPE learned on train.
Language modelling: lines stripped, blank and letterless lines dropped, Moses tokenisation,
the split by documents (by blocks of lines when there are fewer than 20 documents), then BPE or
whole words. Every count is written to prepared/own_corpus.json beside provenance.json.

Everything is built in prepared.partial/ and moved to prepared/ only when complete, so a failed
or interrupted prepare leaves nothing a later stage would take.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from collections import Counter
from typing import List, Tuple

from gpam_fairseq.recipes import catalogs as cat
from gpam_fairseq.recipes import text
from gpam_fairseq.recipes.common import RecipeError, env, env_int, is_done, mark_done, say
from gpam_fairseq.recipes.definitions import ADAM, LABEL_SMOOTHED, Recipe, Size

NAME = "own_corpus"
TASKS = ("translation", "lm")
INFO = "own_corpus.json"
LM_SUFFIXES = (".txt", ".rst", ".md")
MIN_DOCUMENTS = 20  # fewer documents: the LM split goes by blocks of lines
LINE_BLOCK = 50

# --- sizes --------------------------------------------------------------------------------------


def _nmt_shape(layers, dim, ffn, heads):
    return [word for side in ("encoder", "decoder") for word in (
        f"--{side}-layers", str(layers), f"--{side}-embed-dim", str(dim), f"--{side}-ffn-embed-dim", str(ffn),
        f"--{side}-attention-heads", str(heads))]


def _lm_shape(layers, dim, ffn, heads):
    return ["--decoder-layers", str(layers), "--decoder-embed-dim", str(dim), "--decoder-ffn-embed-dim", str(ffn),
            "--decoder-attention-heads", str(heads)]


def _nmt_train(lr, warmup, dropout=0.3):
    return [*ADAM, "--clip-norm", "0.0", "--lr", lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", warmup,
            "--warmup-init-lr", "1e-07", "--dropout", str(dropout), "--weight-decay", "0.0001", *LABEL_SMOOTHED,
            "--max-tokens", "4096"]


def _nmt_size(shape, train, max_update, gpu_steps, note, arch=("transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en"),
              share="--share-decoder-input-output-embed", cpu=True):
    extra = ["--no-epoch-checkpoints"] if cpu else []
    return Size(baseline=["--arch", arch[0], share, *shape], gpam=["--arch", arch[1], share, *shape],
                train=[*train, *extra], max_update=max_update, gpu_steps=gpu_steps, note=note)


NMT_SIZES = {
    "tiny": _nmt_size(_nmt_shape(2, 128, 512, 4), _nmt_train("2e-3", "500"), 2000, 1,
                      "a laptop check: IWSLT's shape shrunk to 2+2 layers, d=128, 4 heads (minutes on 2 CPU cores)"),
    "small": _nmt_size(_nmt_shape(3, 256, 1024, 4), _nmt_train("1e-3", "1000"), 6000, 1,
                       "IWSLT's shape shrunk to 3+3 layers, d=256, FFN 1024, 4 heads: trains on 2 CPU cores in hours"),
    "iwslt": _nmt_size([], _nmt_train("5e-4", "4000"), 50000, 1,
                       "transformer_iwslt_de_en and fairseq's IWSLT14 recipe (6+6 layers, d=512, 4 heads); a GPU",
                       cpu=False),
    "wmt_base": _nmt_size([], [*_nmt_train("7e-4", "4000", 0.1)[:-2], "--max-tokens", "4096"], 100000, 8,
                          "transformer_wmt_en_de (6+6 layers, d=512, 8 heads), Vaswani et al.'s base; GPUs",
                          arch=("transformer_wmt_en_de", "transformer_gpam_wmt_en_de"), cpu=False),
}


def _lm_size(shape, lr, warmup, tokens, max_tokens, max_update, gpu_steps, note, dropout="0.1", cpu=True):
    train = [*ADAM, "--weight-decay", "0.01", "--clip-norm", "0.0", "--lr", lr, "--lr-scheduler", "inverse_sqrt",
             "--warmup-updates", warmup, "--warmup-init-lr", "1e-07", "--dropout", dropout,
             "--tokens-per-sample", str(tokens), "--sample-break-mode", "none", "--max-tokens", str(max_tokens)]
    train += ["--no-epoch-checkpoints"] if cpu else []
    share = "--share-decoder-input-output-embed"
    return Size(baseline=["--arch", "transformer_lm", share, *shape], gpam=["--arch", "transformer_lm_gpam", share, *shape],
                train=train, max_update=max_update, gpu_steps=gpu_steps, note=note,
                eval_args=["--batch-size", "4", "--tokens-per-sample", str(tokens),
                           "--context-window", str(tokens * 3 // 4)])


LM_SIZES = {
    "tiny": _lm_size(_lm_shape(2, 128, 512, 4), "2e-3", "500", 128, 2048, 2000, 1,
                     "a laptop check: transformer_lm shrunk to 2 layers, d=128, 4 heads"),
    "small": _lm_size(_lm_shape(4, 256, 1024, 4), "1e-3", "1000", 256, 4096, 6000, 1,
                      "transformer_lm shrunk to 4 layers, d=256, FFN 1024, 4 heads: trains on 2 CPU cores in hours",
                      dropout="0.2"),
    "base": _lm_size([], "5e-4", "4000", 512, 2048, 50000, 16,
                     "fairseq's transformer_lm README recipe (6 layers, d=512, 8 heads): the shape of WMT base; GPUs",
                     cpu=False),
}


def _translation_preprocess(src, tgt):
    def preprocess(text_dir, setup=None):
        return ["--source-lang", src, "--target-lang", tgt, "--trainpref", f"{text_dir}/train",
                "--validpref", f"{text_dir}/valid", "--testpref", f"{text_dir}/test"]
    return preprocess


def _lm_preprocess(text_dir, setup=None):
    return ["--only-source", "--trainpref", f"{text_dir}/train.txt", "--validpref", f"{text_dir}/valid.txt",
            "--testpref", f"{text_dir}/test.txt"]


def task():
    value = env("TASK", "translation")
    if value not in TASKS:
        raise RecipeError(f"TASK={value!r}: choose translation or lm")
    return value


def languages():
    """(SRC, TGT) for translation (both required, different), (SRC or en, None) for lm."""
    src, tgt = env("SRC"), env("TGT")
    if task() == "lm":
        return (src or "en"), None
    if not src or not tgt:
        raise RecipeError("TASK=translation needs SRC and TGT, the languages' codes (e.g. SRC=fr TGT=en)")
    for name, value in (("SRC", src), ("TGT", tgt)):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_@-]*", value):
            raise RecipeError(f"{name}={value!r}: a language code such as fr, en or pt_BR")
    if src == tgt:
        raise RecipeError(f"SRC={src} and TGT={tgt}: source and target languages must differ")
    return src, tgt


def recipe(strict=True) -> Recipe:
    """The recipe for the current environment (TASK, SRC, TGT). strict=False gives a stand-in
    direction where SRC/TGT are missing (for listings that need no data)."""
    try:
        src, tgt = languages()
    except RecipeError:
        if strict:
            raise
        src, tgt = ("src", "tgt") if task() == "translation" else ("en", None)
    lowercase = _prepared_lowercase()
    if task() == "translation":
        return Recipe(name=NAME, task="translation", prepare=None, preprocess=_translation_preprocess(src, tgt),
                      sizes=NMT_SIZES, default_size="small", directions=(f"{src}-{tgt}",), bleu_lowercase=lowercase,
                      generate_args=["--beam", "5", "--batch-size", "128", "--remove-bpe"],
                      data_subdir=f"{src}-{tgt}")
    return Recipe(name=NAME, task="language_modeling", prepare=None, preprocess=_lm_preprocess, sizes=LM_SIZES,
                  default_size="small", data_subdir=f"lm_{src}")


def _prepared_lowercase():
    """LOWERCASE as the prepare stage applied it (prepared/own_corpus.json), else the variable."""
    data_dir = env("DATA_DIR")
    if data_dir:
        try:
            with open(os.path.join(data_dir, "prepared", INFO), encoding="utf-8") as f:
                return bool(json.load(f).get("lowercase"))
        except (OSError, ValueError):
            pass
    return env("LOWERCASE", "0") == "1"


# --- reading and checking inputs ------------------------------------------------------------


def read_text_lines(path) -> List[str]:
    """The lines of a UTF-8 text file (split at \\n, line ends and a final \\r removed); one line
    and exit 2 for a missing, empty or non-UTF-8 file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read it ({e.strerror})") from None
    if not raw.strip():
        raise RecipeError(f"{path}: empty file")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise RecipeError(f"{path}: line {line} is not UTF-8 (byte {e.start}): convert the file, e.g. "
                          f"iconv -f LATIN1 -t UTF-8") from None
    lines = decoded.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _normalise(line: str) -> str:
    return re.sub(r"\s+", " ", line).strip()


_LETTER = re.compile(r"[^\W\d_]")


def _usable(line: str) -> bool:
    return bool(_LETTER.search(line))


def _read_parallel(src_path, tgt_path):
    src, tgt = read_text_lines(src_path), read_text_lines(tgt_path)
    if len(src) != len(tgt):
        raise RecipeError(f"{src_path} has {len(src):,} lines but {tgt_path} has {len(tgt):,}: the two sides of a "
                          f"parallel corpus must have one line per sentence pair")
    return list(zip(src, tgt))


def read_raw_dir_pairs(raw_dir, src, tgt):
    """{split: pairs} from DIR/{train,valid,test}.{src,tgt}; train is required, valid and test optional
    (each needs both sides)."""
    splits = {}
    for split in ("train", "valid", "test"):
        paths = [os.path.join(raw_dir, f"{split}.{lang}") for lang in (src, tgt)]
        present = [os.path.exists(p) for p in paths]
        if split == "train" and not all(present):
            missing = [p for p, ok in zip(paths, present) if not ok]
            raise RecipeError(f"--raw-dir {raw_dir}: no {', '.join(missing)} (expected train.{src} and train.{tgt}, "
                              f"one sentence per line, optionally valid.* and test.*)")
        if any(present) and not all(present):
            raise RecipeError(f"--raw-dir {raw_dir}: {paths[present.index(True)]} has no partner "
                              f"{paths[present.index(False)]}")
        if all(present):
            splits[split] = _read_parallel(*paths)
    return splits


def read_tsv_pairs(path, order="src-tgt"):
    pairs = []
    for i, line in enumerate(read_text_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise RecipeError(f"{path}: line {i} has {len(fields)} tab-separated field(s), expected 2 (source<TAB>target)")
        pairs.append(tuple(fields) if order == "src-tgt" else (fields[1], fields[0]))
    return pairs


def read_catalog_pairs(paths, src, tgt, msgid_lang="en"):
    """(pairs, summary) from the catalogs among paths whose language is the non-English side."""
    if msgid_lang not in (src, tgt):
        raise RecipeError(f"--catalogs: a catalog pairs {msgid_lang} (msgid) with its own language, but SRC={src} "
                          f"TGT={tgt} has no {msgid_lang}: set one of them to {msgid_lang} (or --msgid-lang)")
    other = tgt if src == msgid_lang else src
    files = cat.find_catalogs(paths)
    if not files:
        raise RecipeError(f"--catalogs {' '.join(paths)}: no .po or .mo file found")
    pairs, used, languages, empty = [], [], Counter(), []
    for path in files:
        catalog = cat.read_catalog(path)
        languages[catalog.language or "unknown"] += 1
        language = catalog.language or other  # no Language header, no <lang>/LC_MESSAGES path: as SRC/TGT say
        if cat.base_language(language) != cat.base_language(other):
            continue
        if not catalog.pairs:
            if path in paths:  # named on its own: say so
                raise RecipeError(f"{path}: a catalog with no translated entries ({catalog.entries} untranslated; "
                                  f"fuzzy and obsolete entries do not count)")
            empty.append(path)
            continue
        used.append({"path": os.path.abspath(path), "language": language, "pairs": len(catalog.pairs),
                     "sha256": _sha256(path)})
        for msgid, msgstr in catalog.pairs:
            pairs.append((msgstr, msgid) if src == other else (msgid, msgstr))
    if not used and empty:
        raise RecipeError(f"--catalogs: {len(empty)} catalog(s) in {other}, none with translated entries "
                          f"(e.g. {empty[0]})")
    if not used:
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(languages.items()))
        raise RecipeError(f"--catalogs: no catalog in {other} with translated entries among {len(files)} file(s) "
                          f"(languages found: {seen})")
    say(f"  catalogs: {len(used)} in {other} ({sum(u['pairs'] for u in used):,} pairs), {len(files) - len(used)} "
        f"other file(s) left out" + (f", {len(empty)} without translated entries" if empty else ""))
    return pairs, used


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- splitting ------------------------------------------------------------------------------


def split_sizes(n, valid_fraction, test_fraction, what="pairs"):
    n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
    if n_valid < 1 or n_test < 1 or n - n_valid - n_test < 1:
        need = math.ceil(0.5 / min(valid_fraction, test_fraction)) + 1
        raise RecipeError(f"only {n:,} {what} left after filtering: too few for --valid-fraction {valid_fraction} and "
                          f"--test-fraction {test_fraction} (at least {need:,} needed); give more data or larger fractions")
    return n_valid, n_test


def random_split(items, valid_fraction, test_fraction, seed, what="pairs"):
    n_valid, n_test = split_sizes(len(items), valid_fraction, test_fraction, what)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    valid = sorted(order[:n_valid])
    test = sorted(order[n_valid:n_valid + n_test])
    held = set(valid) | set(test)
    return {"train": [items[i] for i in range(len(items)) if i not in held], "valid": [items[i] for i in valid],
            "test": [items[i] for i in test]}


# --- the translation pipeline ---------------------------------------------------------------


def _tokenise(lines, lang, lowercase, path):
    text.moses_tokenize(iter(lines), path, lang, lowercase=lowercase, what=f"tokenise {os.path.basename(path)}")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _length_ok(s, t, max_len, ratio):
    ns, nt = len(s.split()), len(t.split())
    return 1 <= ns <= max_len and 1 <= nt <= max_len and ns / nt <= ratio and nt / ns <= ratio


def _write(lines, path):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def prepare_translation(out, splits, src, tgt, opts, counts):
    """splits: {"train": pairs[, "valid", "test"]} of raw (source, target) strings -> out/{split}.{src,tgt}
    (tokenised, BPE), out/{split}.raw.{src,tgt} (normalised text, the references of BLEU)."""
    given = set(splits)
    cleaned = {}
    for split, pairs in splits.items():
        name = "input" if given == {"train"} else split  # counts before the split this stage makes
        kept = [(_normalise(s), _normalise(t)) for s, t in pairs]
        kept = [(s, t) for s, t in kept if _usable(s) and _usable(t)]
        counts[f"{name}_read"], counts[f"{name}_empty_or_letterless"] = len(pairs), len(pairs) - len(kept)
        unique = list(dict.fromkeys(kept))
        counts[f"{name}_duplicates"] = len(kept) - len(unique)
        cleaned[split] = unique
    tok = {}
    for split, pairs in cleaned.items():
        srcs = _tokenise([s for s, _ in pairs], src, opts.lowercase, os.path.join(out, f".{split}.tok.{src}"))
        tgts = _tokenise([t for _, t in pairs], tgt, opts.lowercase, os.path.join(out, f".{split}.tok.{tgt}"))
        rows = list(zip(pairs, srcs, tgts))
        if split == "train" or given == {"train"}:  # filter what we split ourselves; a given valid/test stays whole
            before = len(rows)
            rows = [r for r in rows if _length_ok(r[1], r[2], opts.max_len, opts.len_ratio)]
            counts[f"{'input' if given == {'train'} else split}_length_filtered"] = before - len(rows)
        tok[split] = rows
    if given == {"train"}:
        tok = random_split(tok["train"], opts.valid_fraction, opts.test_fraction, opts.split_seed)
        counts["split"] = f"made here: fractions {opts.valid_fraction}/{opts.test_fraction}, seed {opts.split_seed}"
    else:
        counts["split"] = "given"
        for split in ("valid", "test"):
            if split not in tok:
                raise RecipeError(f"--raw-dir: give both valid.* and test.* or neither (found only {sorted(given)})")
    key = (lambda s: s.lower()) if opts.lowercase else (lambda s: s)
    train_sources = {key(raw[0]) for raw, _, _ in tok["train"]}
    for split in ("valid", "test"):
        before = len(tok[split])
        tok[split] = [r for r in tok[split] if key(r[0][0]) not in train_sources]
        counts[f"{split}_source_in_train_removed"] = before - len(tok[split])
        say(f"  {split}: removed {before - len(tok[split]):,} of {before:,} pairs whose source sentence occurs in train")
        if not tok[split]:
            raise RecipeError(f"{split}: no pair left once the sources seen in train are removed; give more data")
    for split, rows in tok.items():
        counts[split] = len(rows)
        for side, lang in ((0, src), (1, tgt)):
            _write([r[0][side] for r in rows], os.path.join(out, f"{split}.raw.{lang}"))
            _write([r[1 + side] for r in rows], os.path.join(out, f".{split}.tokfinal.{lang}"))
    codes = os.path.join(out, "code")
    text.learn_bpe([os.path.join(out, f".train.tokfinal.{lang}") for lang in (src, tgt)], codes, opts.bpe_size)
    for split in tok:
        for lang in (src, tgt):
            text.apply_bpe(codes, os.path.join(out, f".{split}.tokfinal.{lang}"), os.path.join(out, f"{split}.{lang}"))
        text.check_parallel(os.path.join(out, f"{split}.{src}"), os.path.join(out, f"{split}.{tgt}"), f"BPE of {split}")
    say("  pairs: " + ", ".join(f"{s} {counts[s]:,}" for s in ("train", "valid", "test")))


# --- the language-modelling pipeline --------------------------------------------------------


def read_documents(paths) -> List[Tuple[str, List[str]]]:
    docs = []
    for p in paths:
        if os.path.isdir(p):
            files = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(LM_SUFFIXES)]
            if not files:
                raise RecipeError(f"--text {p}: no .txt, .rst or .md file in it")
        elif os.path.isfile(p):
            files = [p]
        else:
            raise RecipeError(f"--text {p}: no such file or folder")
        docs += [(f, read_text_lines(f)) for f in files]
    return docs


def _lm_lines(lines):
    return [n for n in (_normalise(line) for line in lines) if _usable(n)]


def prepare_lm(out, docs, splits, lang, opts, counts):
    """docs: [(name, lines)] to split here, or splits: {"train": lines, ...} given -> out/{split}.txt."""
    if splits is None:
        docs = [(name, _lm_lines(lines)) for name, lines in docs]
        docs = [d for d in docs if d[1]]
        counts["documents"] = len(docs)
        if len(docs) >= MIN_DOCUMENTS:
            parts = random_split(docs, opts.valid_fraction, opts.test_fraction, opts.split_seed, "documents")
            splits = {k: [line for _, lines in v for line in lines] for k, v in parts.items()}
            counts["split"] = f"by document: fractions {opts.valid_fraction}/{opts.test_fraction}, seed {opts.split_seed}"
        else:
            lines = [line for _, lines in docs for line in lines]
            blocks = [lines[i:i + LINE_BLOCK] for i in range(0, len(lines), LINE_BLOCK)]
            parts = random_split(blocks, opts.valid_fraction, opts.test_fraction, opts.split_seed, "blocks of lines")
            splits = {k: [line for block in v for line in block] for k, v in parts.items()}
            counts["split"] = (f"by blocks of {LINE_BLOCK} lines (fewer than {MIN_DOCUMENTS} documents): fractions "
                               f"{opts.valid_fraction}/{opts.test_fraction}, seed {opts.split_seed}")
    else:
        splits = {k: _lm_lines(v) for k, v in splits.items()}
        counts["split"] = "given"
    tok = {}
    for split, lines in splits.items():
        if not lines:
            raise RecipeError(f"{split}: no line with text in it")
        tok[split] = _tokenise(lines, lang, opts.lowercase, os.path.join(out, f".{split}.tok"))
        counts[f"{split}_lines"] = len(lines)
    if opts.units == "word":
        vocab = Counter(w for line in tok["train"] for w in line.split())
        keep = {w for w, c in vocab.items() if c >= opts.word_min_count}
        for split, lines in tok.items():
            _write([" ".join(w if w in keep else "<unk>" for w in line.split()) for line in lines],
                   os.path.join(out, f"{split}.txt"))
        counts["vocabulary"] = len(keep)
    else:
        for split, lines in tok.items():
            _write(lines, os.path.join(out, f".{split}.tokfinal"))
        codes = os.path.join(out, "code")
        text.learn_bpe([os.path.join(out, ".train.tokfinal")], codes, opts.bpe_size)
        for split in tok:
            text.apply_bpe(codes, os.path.join(out, f".{split}.tokfinal"), os.path.join(out, f"{split}.txt"))
    for split in tok:
        with open(os.path.join(out, f"{split}.txt"), encoding="utf-8") as f:
            counts[f"{split}_tokens"] = sum(len(line.split()) + 1 for line in f)  # + end of line, as fairseq counts
    say("  lines: " + ", ".join(f"{s} {counts[s + '_lines']:,}" for s in ("train", "valid", "test")))


# --- the stage --------------------------------------------------------------------------------


def _fraction(value):
    v = float(value)
    if not 0 < v < 0.5:
        raise argparse.ArgumentTypeError(f"{value}: a fraction between 0 and 0.5")
    return v


def parser(prog):
    p = argparse.ArgumentParser(prog=prog, description="your own corpus -> tokenised, BPE'd text (see the README)")
    i = p.add_argument_group("inputs (one kind)")
    i.add_argument("--raw-dir", metavar="DIR", help="translation: train.SRC, train.TGT [valid.*, test.*]; lm: train.txt [valid.txt, test.txt]")
    i.add_argument("--tsv", metavar="FILE", help="translation: one SRC<TAB>TGT pair per line")
    i.add_argument("--tsv-order", choices=("src-tgt", "tgt-src"), default="src-tgt", help="column order of --tsv")
    i.add_argument("--catalogs", nargs="+", metavar="PATH", help="translation: gettext .po/.mo files or folders")
    i.add_argument("--msgid-lang", default="en", help="the language of the catalogs' msgid strings (default en)")
    i.add_argument("--text", nargs="+", metavar="PATH", help="lm: text files, or folders of .txt/.rst/.md files")
    s = p.add_argument_group("split and filters")
    s.add_argument("--valid-fraction", type=_fraction, default=0.05, help="held out for validation when no split is given (0.05)")
    s.add_argument("--test-fraction", type=_fraction, default=0.05, help="held out for test when no split is given (0.05)")
    s.add_argument("--split-seed", type=int, default=1, help="seed of that split (1)")
    s.add_argument("--max-len", type=int, default=175, help="translation: longest sentence kept, in Moses tokens (175)")
    s.add_argument("--len-ratio", type=float, default=3.0,
                   help="translation: largest length ratio of a pair kept, in tokens, both ways (3.0; fairseq's IWSLT script: 1.5)")
    return p


def stage_prepare(s, argv):
    p = parser(f"{NAME}/prepare.py")
    args = p.parse_args(argv)
    lm = s.recipe.task == "language_modeling"
    kinds = [k for k in (("--raw-dir", args.raw_dir), ("--tsv", args.tsv), ("--catalogs", args.catalogs),
                         ("--text", args.text)) if k[1]]
    if len(kinds) != 1:
        allowed = "--raw-dir or --text" if lm else "--raw-dir, --tsv or --catalogs"
        raise RecipeError(f"give one input: {allowed}" + (f" (got {', '.join(k for k, _ in kinds)})" if kinds else ""))
    kind = kinds[0][0]
    if lm and kind in ("--tsv", "--catalogs"):
        raise RecipeError(f"{kind}: a translation input; TASK=lm takes --raw-dir or --text")
    if not lm and kind == "--text":
        raise RecipeError("--text: a language-modelling input (TASK=lm); translation takes --raw-dir, --tsv or --catalogs")
    if args.raw_dir and not os.path.isdir(args.raw_dir):
        raise RecipeError(f"--raw-dir {args.raw_dir}: no such directory")
    opts = argparse.Namespace(**vars(args), lowercase=env("LOWERCASE", "0") == "1", bpe_size=env_int("BPE_SIZE", 10000),
                              units=env("UNITS", "bpe"), word_min_count=env_int("WORD_MIN_COUNT", 3))
    if opts.units not in ("bpe", "word"):
        raise RecipeError(f"UNITS={opts.units!r}: choose bpe or word")
    if is_done(s.prepared, "prepare"):
        say(f"[prepare] already done: {s.prepared} (FORCE=1 redoes it)")
        return
    src, tgt = languages()
    partial = s.prepared + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    say(f"[prepare] own_corpus ({'lm, ' + src if lm else src + '->' + tgt}) from {kind} -> {s.prepared}")
    try:
        _prepare_into(partial, s, args, opts, kind, lm, src, tgt)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left behind
        raise
    shutil.rmtree(s.prepared, ignore_errors=True)
    os.replace(partial, s.prepared)
    say(f"[prepare] done: {s.prepared} (counts in {INFO})")


def _prepare_into(partial, s, args, opts, kind, lm, src, tgt):
    counts, inputs = {}, []
    if lm:
        if args.raw_dir:
            paths = {k: os.path.join(args.raw_dir, f"{k}.txt") for k in ("train", "valid", "test")}
            if not os.path.exists(paths["train"]):
                raise RecipeError(f"--raw-dir {args.raw_dir}: no train.txt (use --text for a folder of documents)")
            given = {k: read_text_lines(p) for k, p in paths.items() if os.path.exists(p)}
            if set(given) not in ({"train"}, {"train", "valid", "test"}):
                raise RecipeError(f"--raw-dir {args.raw_dir}: give both valid.txt and test.txt or neither")
            inputs = [p for k, p in paths.items() if k in given]
            docs = [(paths["train"], given["train"])] if len(given) == 1 else None
            prepare_lm(partial, docs, None if docs else given, src, opts, counts)
        else:
            docs = read_documents(args.text)
            inputs = [d[0] for d in docs]
            prepare_lm(partial, docs, None, src, opts, counts)
    else:
        if args.raw_dir:
            splits = read_raw_dir_pairs(args.raw_dir, src, tgt)
            inputs = [os.path.join(args.raw_dir, f"{k}.{lang}") for k in splits for lang in (src, tgt)]
        elif args.tsv:
            splits = {"train": read_tsv_pairs(args.tsv, args.tsv_order)}
            inputs = [args.tsv]
        else:
            pairs, used = read_catalog_pairs(args.catalogs, src, tgt, args.msgid_lang)
            splits = {"train": pairs}
            counts["catalogs"] = used
        prepare_translation(partial, splits, src, tgt, opts, counts)
    files = counts.pop("catalogs", None) or [{"path": os.path.abspath(p), "size": os.path.getsize(p), "sha256": _sha256(p)}
                                             for p in inputs]
    info = {"recipe": NAME, "task": s.recipe.task, "src": src, "tgt": tgt, "input": kind, "lowercase": opts.lowercase,
            "units": "bpe" if not lm else opts.units, "bpe_size": opts.bpe_size, "max_len": args.max_len,
            "len_ratio": args.len_ratio, "counts": counts}
    with open(os.path.join(partial, INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(partial, "provenance.json"), "w", encoding="utf-8") as f:
        json.dump({"recipe": NAME, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "input": kind, "files": files}, f, indent=1)
    for hidden in os.listdir(partial):
        if hidden.startswith(".") and not hidden.endswith(".done"):
            os.remove(os.path.join(partial, hidden))
    mark_done(partial, "prepare")
