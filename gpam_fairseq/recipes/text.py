"""Text processing of fairseq's prepare scripts, in Python: Moses tokenisation and punctuation
normalisation (sacremoses), corpus cleaning (clean-corpus-n.perl), BPE (subword-nmt's API).

Everything streams line by line through a process pool (`WORKERS`, default: all cores) and
prints progress, so the WMT corpora (4.5M pairs) go through in reasonable time.

Parallel corpora: a step that treats the two sides separately is followed by
:func:`check_parallel`, which stops with one line naming both files and their line counts
when they no longer match. Source files are read as the Perl scripts read them, split at
``\n`` only (a stray carriage return inside a line stays in that line, as it would for
``cat | perl``, and is removed by the tokeniser or turned into a space); every file written
here is free of ``\r``, so fairseq-preprocess, which reads with Python's universal newlines,
sees the same lines.
"""

import multiprocessing as mp
import os
import re
import unicodedata

from gpam_fairseq.recipes.common import Progress, RecipeError, env_int, say

_worker = {}


def workers() -> int:
    return max(1, env_int("WORKERS", os.cpu_count() or 1))


# --- Moses tokenisation -------------------------------------------------------------------

def _init_moses(lang, lowercase, aggressive, normalize):
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    _worker.update(tok=MosesTokenizer(lang=lang), lowercase=lowercase, aggressive=aggressive,
                   norm=MosesPunctNormalizer(lang=lang) if normalize else None)


def _remove_non_printing(line: str) -> str:
    # remove-non-printing-char.perl: s/\p{C}/ /g
    return "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in line)


def _moses_line(line: str) -> str:
    line = line.rstrip("\n")
    if _worker["norm"] is not None:  # normalize-punctuation.perl | remove-non-printing-char.perl
        line = _remove_non_printing(_worker["norm"].normalize(line))
    # tokenizer.perl [-a] -l LANG (escaping on, its default)
    out = _worker["tok"].tokenize(line, aggressive_dash_splits=_worker["aggressive"], return_str=True, escape=True)
    return out.lower() if _worker["lowercase"] else out  # lowercase.perl


def moses_tokenize(lines, out_path, lang, lowercase=False, aggressive=False, normalize=False, what=None):
    """Tokenise an iterable of lines into out_path (in order)."""
    progress = Progress(what or f"tokenise {os.path.basename(out_path)}")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    n_workers = workers()
    with open(out_path, "w", encoding="utf-8") as out:
        if n_workers == 1:
            _init_moses(lang, lowercase, aggressive, normalize)
            results = map(_moses_line, lines)
            for tok in results:
                out.write(tok + "\n")
                progress.update()
        else:
            with mp.get_context("fork").Pool(n_workers, _init_moses, (lang, lowercase, aggressive, normalize)) as pool:
                for tok in pool.imap(_moses_line, lines, chunksize=2000):
                    out.write(tok + "\n")
                    progress.update()
    progress.close()


def moses_detokenize(lines, lang):
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split(), unescape=True) for line in lines]


# --- reading source files, checking parallel files -----------------------------------------

def source_lines(path):
    """The lines of a source file as Perl's `cat` and `grep` see them: split at \\n only,
    without the line end (a CRLF file's \\r too); any other \\r becomes a space."""
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            yield line.rstrip("\n").rstrip("\r").replace("\r", " ")


def count_lines(path, newline=None):
    """Lines of a file as Python and fairseq-preprocess read it (universal newlines), or split at
    \\n only with newline="\\n" (as source_lines() reads it)."""
    with open(path, encoding="utf-8", errors="replace", newline=newline) as f:
        return sum(1 for _ in f)


def check_parallel(src_path, tgt_path, step, newline=None):
    """Stop (RecipeError, one line) unless the two sides of a parallel corpus have as many lines."""
    n_src, n_tgt = count_lines(src_path, newline), count_lines(tgt_path, newline)
    if n_src != n_tgt:
        raise RecipeError(
            f"{step}: {src_path} has {n_src:,} lines but {tgt_path} has {n_tgt:,}; the two sides of a "
            f"parallel corpus must have one line per sentence pair: check the input files")
    return n_src


def check_preprocess_inputs(preprocess_args):
    """Before fairseq-preprocess binarises each side on its own: the text files of every split
    named by --trainpref/--validpref/--testpref line up (translation: --source-lang/--target-lang)."""
    args = dict(zip(preprocess_args, preprocess_args[1:]))
    if "--source-lang" not in args or "--target-lang" not in args:
        return
    for flag in ("--trainpref", "--validpref", "--testpref"):
        if flag in args:
            prefix = args[flag]
            check_parallel(f"{prefix}.{args['--source-lang']}", f"{prefix}.{args['--target-lang']}",
                           f"fairseq-preprocess {flag}")


# --- XML / SGM / tag files ------------------------------------------------------------------

# prepare-iwslt14.sh on train.tags.*: `grep -v` the <url>, <talkid> and <keywords> lines (each
# talk's metadata), `sed` the <title>/<description> tags away (their text stays). Only whole
# metadata lines are dropped: a sentence that merely mentions "<url>" is a sentence.
IWSLT_TRAIN_DROP = ("url", "talkid", "keywords")
IWSLT_TRAIN_STRIP = ("title", "description")
_IWSLT_METADATA = re.compile(r"\s*<(%s)>.*</\1>\s*" % "|".join(IWSLT_TRAIN_DROP))
_IWSLT_STRIP = re.compile(r"(\s*)<(%s)>(.*)</\2>(\s*)" % "|".join(IWSLT_TRAIN_STRIP))
_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def is_iwslt_metadata(line: str) -> bool:
    """A <url>...</url>, <talkid>...</talkid> or <keywords>...</keywords> line."""
    return _IWSLT_METADATA.fullmatch(line) is not None


def strip_iwslt_tags(line: str) -> str:
    """A <title>...</title> or <description>...</description> line loses its tags (and keeps
    its text); every other line is returned unchanged."""
    m = _IWSLT_STRIP.fullmatch(line)
    return m.group(1) + m.group(3) + m.group(4) if m else line


def iwslt_train_pairs(src_path, tgt_path, src_out, tgt_out):
    """prepare-iwslt14.sh's tag handling of train.tags.*, on both sides in lockstep: a pair is
    dropped when both of its lines are metadata lines, and the tag files must have the same
    number of lines with their metadata lines in the same places. Returns the pairs kept."""
    check_parallel(src_path, tgt_path, "train tag files", newline="\n")
    kept = 0
    with open(src_out, "w", encoding="utf-8") as out_s, open(tgt_out, "w", encoding="utf-8") as out_t:
        for i, (s, t) in enumerate(zip(source_lines(src_path), source_lines(tgt_path)), start=1):
            meta_s, meta_t = is_iwslt_metadata(s), is_iwslt_metadata(t)
            if meta_s != meta_t:
                raise RecipeError(
                    f"train tag files: line {i:,} is a metadata line (<url>, <talkid>, <keywords>) in "
                    f"{src_path if meta_s else tgt_path} but a sentence in {tgt_path if meta_s else src_path}; "
                    f"the two files are not aligned: check them")
            if meta_s:
                continue
            out_s.write(strip_iwslt_tags(s) + "\n")
            out_t.write(strip_iwslt_tags(t) + "\n")
            kept += 1
    say(f"  tags: kept {kept:,} training pairs")
    return kept


def seg_lines(path):
    """`grep '<seg id' | sed` of the prepare scripts: the text of each <seg id="N"> line (xml or sgm)."""
    for line in source_lines(path):
        if "<seg id" not in line:
            continue
        line = _SEG_CLOSE.sub("", _SEG_OPEN.sub("", line))
        yield line.replace("\u2019", "'")


# --- clean-corpus-n.perl ----------------------------------------------------------------------

def _squeeze(line: str) -> str:
    return re.sub(r"\s+", " ", line).strip()


def clean_corpus(src_in, tgt_in, src_out, tgt_out, ratio=1.5, min_len=1, max_len=175):
    """clean-corpus-n.perl -ratio R: keep pairs whose lengths (in words) lie in [min, max] and
    whose length ratio is at most R both ways; whitespace squeezed like the Perl script."""
    check_parallel(src_in, tgt_in, "clean-corpus input")
    kept = total = 0
    with open(src_in, encoding="utf-8") as fs, open(tgt_in, encoding="utf-8") as ft, \
            open(src_out, "w", encoding="utf-8") as os_, open(tgt_out, "w", encoding="utf-8") as ot:
        for s, t in zip(fs, ft):
            total += 1
            s, t = _squeeze(s), _squeeze(t)
            if not s or not t:
                continue
            ns, nt = len(s.split(" ")), len(t.split(" "))
            if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
                continue
            if ns / nt > ratio or nt / ns > ratio:
                continue
            os_.write(s + "\n")
            ot.write(t + "\n")
            kept += 1
    say(f"  clean-corpus (ratio {ratio}, length {min_len}-{max_len}): kept {kept:,} of {total:,} pairs")
    return kept


# --- BPE (subword-nmt) ------------------------------------------------------------------------

def learn_bpe(input_paths, codes_path, num_symbols):
    """learn_bpe.py -s N on the concatenation of input_paths (the joint BPE of the recipes)."""
    from subword_nmt.learn_bpe import learn_bpe as _learn

    joined = codes_path + ".train"
    with open(joined, "w", encoding="utf-8") as out:
        for p in input_paths:
            with open(p, encoding="utf-8") as f:
                for line in f:
                    out.write(line)
    say(f"  learn_bpe: {num_symbols} merges on {', '.join(os.path.basename(p) for p in input_paths)}")
    with open(joined, encoding="utf-8") as inp, open(codes_path + ".part", "w", encoding="utf-8") as out:
        _learn(inp, out, num_symbols, num_workers=workers())
    os.replace(codes_path + ".part", codes_path)
    os.remove(joined)


def _init_bpe(codes_path):
    from subword_nmt.apply_bpe import BPE

    with open(codes_path, encoding="utf-8") as f:
        _worker["bpe"] = BPE(f)


def _bpe_line(line):
    return _worker["bpe"].process_line(line)


def apply_bpe(codes_path, in_path, out_path):
    progress = Progress(f"apply_bpe {os.path.basename(in_path)}")
    with open(in_path, encoding="utf-8") as inp, open(out_path, "w", encoding="utf-8") as out:
        if workers() == 1:
            _init_bpe(codes_path)
            results = map(_bpe_line, inp)
            for line in results:
                out.write(line)
                progress.update()
        else:
            with mp.get_context("fork").Pool(workers(), _init_bpe, (codes_path,)) as pool:
                for line in pool.imap(_bpe_line, inp, chunksize=2000):
                    out.write(line)
                    progress.update()
    progress.close()


def every_nth_split(in_path, keep_path, held_path, n):
    """awk 'NR%n == 0' -> held (valid), the rest -> keep (train)."""
    with open(in_path, encoding="utf-8") as inp, open(keep_path, "w", encoding="utf-8") as keep, \
            open(held_path, "w", encoding="utf-8") as held:
        for i, line in enumerate(inp, start=1):
            (held if i % n == 0 else keep).write(line)


def concat(paths, out_path):
    with open(out_path, "w", encoding="utf-8") as out:
        for p in paths:
            with open(p, encoding="utf-8") as f:
                for line in f:
                    out.write(line)
