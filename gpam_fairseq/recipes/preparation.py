"""Stage 1 of each recipe: the official sources -> tokenised (and BPE'd) text, as fairseq's
prepare scripts make it (examples/translation/prepare-iwslt14.sh, prepare-wmt14en2de.sh
--icml17, the scaling_nmt data rebuilt as google/seq2seq's wmt16_en_de.sh builds it,
examples/language_model/prepare-wikitext-103.sh, transformer-xl's prep_enwik8.py, PTB from
Mikolov's simple-examples).

Each source file (gpam_fairseq.recipes.sources) comes from, in this order: an `--archive PATH`
whose file name matches, `--raw-dir DIR/<name>`, a file already in `<data>/orig/` (downloaded
earlier or placed there by hand), else a download (`--mirror URL`s first, then the built-in
sources), each file on its own: files given by hand and downloaded ones mix freely. Wherever it
came from, its size and checksum are verified before use (gpam_fairseq.recipes.downloads), and
what was used is written to `prepared/provenance.json`. An archive that cannot be unpacked, at
whatever stage, stops the stage with one line naming it (:func:`extract`).
"""

import dataclasses
import glob
import json
import os
import re
import shutil
import tarfile
import time
import zipfile
import zlib

from gpam_fairseq.recipes import sources as S
from gpam_fairseq.recipes import text
from gpam_fairseq.recipes.common import RecipeError, env_int, say
from gpam_fairseq.recipes.downloads import Mismatch, SourceFile, TrustStore, check_file, expected_text, fetch

PROVENANCE = "provenance.json"


class Sources:
    """Where the prepare stage finds its input files (see the module docstring), each verified,
    and the record of what was used (:meth:`write_provenance`)."""

    def __init__(self, orig_dir, archives=(), raw_dir=None, mirrors=(), verify=True, only_mirrors=False):
        self.orig_dir, self.archives, self.raw_dir = orig_dir, [os.path.abspath(a) for a in archives], raw_dir
        self.mirrors, self.verify, self.builtin = list(mirrors), verify, not only_mirrors
        if only_mirrors and not self.mirrors:
            raise RecipeError("--only-mirrors: give the mirrors with --mirror URL")
        self.trust = TrustStore(orig_dir)
        self.used = []
        for a in self.archives:
            if not os.path.exists(a):
                raise RecipeError(f"--archive {a}: no such file")
        if raw_dir and not os.path.isdir(raw_dir):
            raise RecipeError(f"--raw-dir {raw_dir}: no such directory")
        for m in self.mirrors:
            if not re.match(r"^(https?|ftp|file)://", m):
                raise RecipeError(f"--mirror {m}: not a URL (http://, https://, ftp:// or file://)")

    def has(self, src: SourceFile):
        """Whether src was passed with --archive, lies in --raw-dir or already in orig/."""
        return bool(self._given(src)) or os.path.exists(os.path.join(self.orig_dir, src.name))

    def _given(self, src, single=False):
        names = set(src.names())
        found = [(f"--archive {a}", a) for a in self.archives if os.path.basename(a) in names]
        if not found and single and len(self.archives) == 1:
            found = [(f"--archive {self.archives[0]}", self.archives[0])]  # a one-archive recipe: whatever its name
        if not found and self.raw_dir:
            found = [(f"--raw-dir file {os.path.join(self.raw_dir, n)}", os.path.join(self.raw_dir, n))
                     for n in src.names() if os.path.exists(os.path.join(self.raw_dir, n))][:1]
        return found

    def _check(self, path, src, origin):
        if not self.verify:  # sha256 for the record, nothing compared
            record = check_file(path, dataclasses.replace(src, size=None, sha256=None, sha1=None, md5=None), None, origin)
            record["verified"] = "no (--no-verify)"
            return record
        return check_file(path, src, self.trust, origin)

    def get(self, src: SourceFile, single=False):
        """Path of source file `src` in orig/ (a link to the --archive/--raw-dir file, or downloaded),
        its bytes verified."""
        dest = os.path.join(self.orig_dir, src.name)
        os.makedirs(self.orig_dir, exist_ok=True)
        given = self._given(src, single)
        if given:
            what, path = given[0]
            path = os.path.abspath(path)
            try:
                record = self._check(path, src, path)
            except Mismatch as e:
                raise RecipeError(
                    f"{what}: {e}: this is not {src.name} as published"
                    f"{' (' + src.reference + ')' if src.checksum else ''}; pass the right file ({expected_text(src, self.trust.get(src.name))}), "
                    f"or add --no-verify to use it anyway (provenance then records it as unverified)") from None
            if path != os.path.abspath(dest):
                say(f"  {src.name}: from {path}")
                if os.path.lexists(dest):
                    os.remove(dest)
                try:  # a link, not a copy: the WMT archives are gigabytes
                    os.symlink(path, dest)
                except OSError:
                    shutil.copyfile(path, dest)
        elif os.path.exists(dest):  # downloaded by an earlier run, or placed there by hand
            try:
                record = self._check(dest, src, dest)
            except Mismatch as e:
                raise RecipeError(
                    f"{dest}: {e}: not {src.name} as published; delete it (the next run downloads it again) or put the "
                    f"right file there ({expected_text(src, self.trust.get(src.name))})") from None
            say(f"  {src.name}: {dest} ({record['verified']})")
        else:  # the files given by hand (--archive, --raw-dir) leave this one to the mirrors and downloads
            if self.verify:
                record = fetch(src, dest, self.mirrors, self.trust, self.builtin)
            else:
                fetch(dataclasses.replace(src, size=None, sha256=None, sha1=None, md5=None), dest, self.mirrors, None,
                      self.builtin)
                record = self._check(dest, src, "download")
            say(f"  {src.name}: {record['size']:,} bytes, sha256 {record['sha256']} ({record['verified']})")
        self.used = [r for r in self.used if r["file"] != src.name] + [record]
        return dest

    def write_provenance(self, prepared_dir, **about):
        """prepared/provenance.json: name, size, sha256, origin and verification of every file used."""
        os.makedirs(prepared_dir, exist_ok=True)
        data = {**about, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "files": self.used}
        path = os.path.join(prepared_dir, PROVENANCE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)
        return path


def damaged(archive, err):
    """The one line for an archive that cannot be read (truncated, corrupt, not that format)."""
    where = os.path.realpath(archive)
    given = f" (a link to {where})" if where != os.path.abspath(archive) else ""
    return RecipeError(
        f"{archive}{given}: cannot be unpacked ({' '.join(str(err).split()) or type(err).__name__}): the file is "
        f"damaged or not {os.path.basename(archive)}; delete it (the next run downloads it again) or pass a good "
        f"copy with --archive PATH")


def extract(archive, into):
    """Unpack a .tgz/.tar.gz/.zip into `into` once (a marker file records it); a damaged archive
    is one RecipeError line."""
    marker = os.path.join(into, f".{os.path.basename(archive)}.extracted")
    if os.path.exists(marker):
        return
    say(f"  extracting {os.path.basename(archive)}")
    os.makedirs(into, exist_ok=True)
    try:
        if archive.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)
        else:
            with tarfile.open(archive) as t:
                try:
                    t.extractall(into, filter="data")  # no absolute paths or links out of `into`
                except TypeError:  # Python without extraction filters
                    t.extractall(into)
    except (EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
        raise damaged(archive, e) from None
    except OSError as e:
        if e.errno is not None:  # the disk's own errors (full, permissions) are not the archive's fault
            raise
        raise damaged(archive, e) from None  # gzip.BadGzipFile and the like
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

IWSLT14_TEST = S.IWSLT14_TEST_SETS  # prepare-iwslt14.sh's test set, in its order


def prepare_iwslt14(data_dir, sources, bpe_tokens=10000):
    """prepare-iwslt14.sh: Moses tokenisation, clean (ratio 1.5, 1-175), lowercase, valid = every
    23rd training line, test = dev2010 + TEDX dev2012 + tst2010-2012, 10k joint BPE."""
    src, tgt, lang = "de", "en", "de-en"
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    tmp = os.path.join(prep, "tmp")
    os.makedirs(tmp, exist_ok=True)
    extract(sources.get(S.IWSLT14_DE_EN, single=True), orig)
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

WMT14_ICML17 = (  # prepare-wmt14en2de.sh --icml17: (source file, corpus path inside)
    (S.EUROPARL_V7_WMT13, "training/europarl-v7.de-en"),
    (S.COMMONCRAWL, "commoncrawl.de-en"),
    (S.NEWS_COMMENTARY_V9, "training/news-commentary-v9.de-en"),
)


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
    for src_file, corpus in WMT14_ICML17:
        extract(sources.get(src_file), orig)
        corpora.append(os.path.join(orig, corpus))
    extract(sources.get(S.WMT14_TEST_FULL), orig)

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
    """fairseq's scaling_nmt data (WMT16 En-De, 32k joint BPE; newstest2013 valid, newstest2014
    test): rebuilt from statmt.org as google/seq2seq's wmt16_en_de.sh built Google's archive, or
    Google's archive itself (wmt16_en_de.tar.gz) when one is passed with --archive or --raw-dir."""
    if sources.has(S.WMT16_GOOGLE_ARCHIVE):
        return _wmt16_from_google_archive(data_dir, sources)
    return rebuild_wmt16_en_de(data_dir, sources)


def input_from_sgm(path):
    """Moses' ems/support/input-from-sgm.perl: the text of every <seg ...>...</seg> (a segment may
    span lines), whitespace runs squeezed to one space, trimmed."""
    with open(path, encoding="utf-8", newline="\n") as f:
        content = f.read().replace("\r", "")
    for m in re.finditer(r"<seg[^>]*>(.*?)</seg>", content, flags=re.I | re.S):
        yield re.sub(r"\s+", " ", m.group(1)).strip()


def _newstest(dev, year, pair_tag, lang, role):
    """A newstest set's raw lines: the plain-text file dev.tgz ships for older years (what
    wmt16_en_de.sh copies), else its SGML through input_from_sgm."""
    plain = os.path.join(dev, f"newstest{year}.{lang}")
    if os.path.exists(plain):
        return list(text.source_lines(plain))
    sgm = need(os.path.join(dev, f"newstest{year}{pair_tag}-{role}.{lang}.sgm"), "is this WMT16's dev.tgz?")
    return list(input_from_sgm(sgm))


def rebuild_wmt16_en_de(data_dir, sources, bpe_tokens=32000):
    """google/seq2seq's bin/data/wmt16_en_de.sh, the script that made wmt16_en_de.tar.gz:
    train = Europarl v7 + Common Crawl + News Commentary v11; newstest2014 from dev.tgz's
    newstest2014-deen SGML (input-from-sgm.perl); tokenizer.perl -l LANG (no -a, no punctuation
    normalisation); clean-corpus-n.perl 1 80 (its default ratio 9) on train; 32k BPE learned on
    train.tok.clean.de + train.tok.clean.en and applied to train (cleaned) and the newstest sets
    (tokenised, not cleaned): the archive's train.tok.clean.bpe.32000, newstest2013.tok.bpe.32000
    and newstest2014.tok.bpe.32000, which fairseq's scaling_nmt uses."""
    src, tgt = "en", "de"
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    tmp = os.path.join(prep, "tmp")
    os.makedirs(tmp, exist_ok=True)
    parts = {}
    for src_file, sub, corpus in ((S.EUROPARL_V7_DE_EN, "europarl-v7-de-en", "europarl-v7.de-en"),
                                  (S.COMMONCRAWL, "common-crawl", "commoncrawl.de-en"),
                                  (S.NEWS_COMMENTARY_V11, "nc-v11", "training-parallel-nc-v11/news-commentary-v11.de-en")):
        extract(sources.get(src_file), os.path.join(orig, sub))
        parts[sub] = os.path.join(orig, sub, corpus)
    extract(sources.get(S.WMT16_DEV), os.path.join(orig, "dev"))
    dev = os.path.join(orig, "dev", "dev")

    say("[prepare] train data: Europarl v7 + Common Crawl + News Commentary v11, tokenise")
    for c in parts.values():
        text.check_parallel(*(need(f"{c}.{l}", "an archive of the WMT16 training data lacks it") for l in (src, tgt)),
                            "training corpus", newline="\n")
    tok = {l: os.path.join(tmp, f"train.tok.{l}") for l in (src, tgt)}
    for l in (src, tgt):
        text.moses_tokenize(_chain_files(f"{c}.{l}" for c in parts.values()), tok[l], l)
    text.check_parallel(tok[src], tok[tgt], "tokenisation")
    clean = {l: os.path.join(tmp, f"train.tok.clean.{l}") for l in (src, tgt)}
    text.clean_corpus(tok[src], tok[tgt], clean[src], clean[tgt], ratio=9, min_len=1, max_len=80)
    text.check_parallel(clean[src], clean[tgt], "clean-corpus")

    say("[prepare] newstest2013 (valid), newstest2014 (test): raw text, tokenise")
    for year, split, tag in (("2013", "valid", ""), ("2014", "test", "-deen")):
        raw = {src: _newstest(dev, year, tag, src, "ref" if tag else "src"),
               tgt: _newstest(dev, year, tag, tgt, "src" if tag else "ref")}
        for l in (src, tgt):
            write_lines(raw[l], os.path.join(tmp, f"newstest{year}.{l}"))
            text.moses_tokenize(raw[l], os.path.join(tmp, f"newstest{year}.tok.{l}"), l)
        text.check_parallel(*(os.path.join(tmp, f"newstest{year}.{l}") for l in (src, tgt)), f"lines of newstest{year}")
        text.check_parallel(*(os.path.join(tmp, f"newstest{year}.tok.{l}") for l in (src, tgt)),
                            f"tokenisation of newstest{year}")
    for l in (src, tgt):  # untokenised newstest2014 for sacreBLEU
        shutil.copyfile(os.path.join(tmp, f"newstest2014.{l}"), os.path.join(prep, f"test.raw.{l}"))

    codes = os.path.join(prep, "code")
    text.learn_bpe([clean[tgt], clean[src]], codes, bpe_tokens)  # cat train.tok.clean.de train.tok.clean.en
    for split, stem in (("train", "train.tok.clean"), ("valid", "newstest2013.tok"), ("test", "newstest2014.tok")):
        outs = [os.path.join(prep, f"{split}.{l}") for l in (src, tgt)]
        for l, out in zip((src, tgt), outs):
            text.apply_bpe(codes, os.path.join(tmp, f"{stem}.{l}"), out)
        text.check_parallel(*outs, f"BPE of {split}")
    return prep


def _wmt16_from_google_archive(data_dir, sources):
    """Google's preprocessed archive as it is (a copy a lab kept: its Drive link is dead)."""
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    os.makedirs(prep, exist_ok=True)
    extract(sources.get(S.WMT16_GOOGLE_ARCHIVE, single=True), orig)
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

def prepare_wikitext103(data_dir, sources):
    """prepare-wikitext-103.sh: unzip wikitext-103-v1.zip (word level, already tokenised)."""
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    os.makedirs(prep, exist_ok=True)
    extract(sources.get(S.WIKITEXT103, single=True), orig)
    for split in ("train", "valid", "test"):
        src = need(os.path.join(orig, "wikitext-103", f"wiki.{split}.tokens"), "is this wikitext-103-v1.zip?")
        shutil.copyfile(src, os.path.join(prep, f"{split}.txt"))
        say(f"  {split}: {text.count_lines(src):,} lines")
    return prep


def prepare_enwik8(data_dir, sources, num_test_chars=None):
    """transformer-xl's prep_enwik8.py: the first 10^8 bytes, last 2 x 5M bytes are valid and
    test; each byte becomes a token (its decimal value), a newline ends a line (fairseq's eos).
    ENWIK8_HELDOUT_BYTES changes the 5M (only for small test archives)."""
    num_test_chars = num_test_chars or env_int("ENWIK8_HELDOUT_BYTES", 5_000_000)
    prep = os.path.join(data_dir, "prepared")
    os.makedirs(prep, exist_ok=True)
    archive = sources.get(S.ENWIK8, single=True)
    try:
        with zipfile.ZipFile(archive) as z:
            if "enwik8" not in z.namelist():
                raise RecipeError(f"{archive}: holds no member 'enwik8'; is this enwik8.zip?")
            data = z.read("enwik8")
    except (EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise damaged(archive, e) from None
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


def prepare_ptb(data_dir, sources):
    """Penn Treebank as Mikolov preprocessed it (10k words, <unk>): ptb.{train,valid,test}.txt,
    from --raw-dir, from simple-examples.tgz (--archive), or downloaded."""
    orig = os.path.join(data_dir, "orig")
    prep = os.path.join(data_dir, "prepared")
    os.makedirs(prep, exist_ok=True)
    tgz = [a for a in sources.archives if a.endswith((".tgz", ".tar.gz"))]
    if tgz:
        extract(sources.get(S.PTB_SIMPLE_EXAMPLES, single=True), orig)
    for split in ("train", "valid", "test"):
        name = f"ptb.{split}.txt"
        inside = glob.glob(os.path.join(orig, "**", "data", name), recursive=True)
        path = inside[0] if tgz and inside else sources.get(S.PTB_TEXT[split])
        shutil.copyfile(path, os.path.join(prep, f"{split}.txt"))
        say(f"  {split}: {text.count_lines(path):,} lines")
    return prep
