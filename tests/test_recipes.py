"""The recipes of examples/<task>/ end to end, offline, on fixture archives in each real format.

The fixtures are generated here: IWSLT14's de-en.tgz (tag and XML files), WMT14's statmt
tarballs (plain text and newstest2014 SGML), wikitext-103-v1.zip, enwik8.zip and PTB's text
files. IWSLT14 and WikiText-103 run all four stages with a tiny model (EXTRA_ARGS, MAX_UPDATE),
the others prepare + preprocess.
"""

import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

from helpers import REPO

EXAMPLES = os.path.join(REPO, "examples")
BIN = os.path.dirname(sys.executable)

DE_EN = [("haus", "house"), ("katze", "cat"), ("hund", "dog"), ("rot", "red"), ("groß", "big"),
         ("klein", "small"), ("sieht", "sees"), ("mag", "likes"), ("der", "the"), ("und", "and"),
         ("baum", "tree"), ("blau", "blue"), ("schnell", "fast"), ("alt", "old"), ("neu", "new")]


def sentence_pairs(n, seed=0, min_len=3, max_len=9):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rng.choice(DE_EN) for _ in range(rng.randint(min_len, max_len))]
        de = " ".join(w[0] for w in words)
        en = " ".join(w[1] for w in words)
        # capitals, punctuation, an apostrophe and a hyphen: tokenisation and lowercasing matter
        pairs.append((de.capitalize() + ", oder?", en.capitalize() + "'s, right?"))
    return pairs


def add_file(tar, name, text):
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def seg_file(lines, kind, lang):
    segs = "\n".join(f'<seg id="{i + 1}"> {line} </seg>' for i, line in enumerate(lines))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<{kind} setid="x" srclang="de" trglang="en" '
            f'lang="{lang}">\n<doc docid="1">\n<talkid>1</talkid>\n{segs}\n</doc>\n</{kind}>\n</mteval>\n')


def make_iwslt14_archive(path):
    """de-en.tgz as fairseq's URL serves it: train tag files and the TED/TEDX XML sets."""
    train = sentence_pairs(600, seed=1)
    train += [("Ein sehr langer satz " * 60, "short")]  # removed by the cleaning (length, ratio)
    with tarfile.open(path, "w:gz") as tar:
        for k, lang in enumerate(("de", "en")):
            lines = ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks, x</keywords>",
                     "<talkid>1</talkid>", "<title>Ein Titel</title>" if lang == "de" else "<title>A title</title>",
                     "<description>Beschreibung</description>" if lang == "de" else "<description>About</description>"]
            lines += [p[k] for p in train]
            add_file(tar, f"de-en/train.tags.de-en.{lang}", "\n".join(lines) + "\n")
            for j, name in enumerate(("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                                      "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")):
                test = sentence_pairs(8, seed=100 + j)
                add_file(tar, f"de-en/{name}.de-en.{lang}.xml",
                         seg_file([p[k] for p in test], "refset" if lang == "en" else "srcset", lang))
    return len(train)


def run_stage(recipe, stage, env, *args):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, recipe, f"{stage}.py"), *args],
                          capture_output=True, text=True, env={**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"],
                                                               **env}, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"{recipe}/{stage} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def dirs_env(root, **extra):
    return {"DATA_DIR": str(root / "data"), "SAVE_DIR": str(root / "ckpt"), "RUNS_DIR": str(root / "runs"),
            "WORKERS": "1", "NGPUS": "0", "UPDATE_FREQ": "1", **extra}


TINY_NMT = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
            "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
            "--decoder-attention-heads 2 --max-tokens 1024 --warmup-updates 5 --lr 3e-3 --no-epoch-checkpoints "
            "--log-interval 5")


@pytest.fixture(scope="module")
def iwslt(tmp_path_factory):
    root = tmp_path_factory.mktemp("iwslt14")
    archive = root / "de-en.tgz"
    n_train = make_iwslt14_archive(str(archive))
    env = dirs_env(root)
    out = run_stage("iwslt14", "prepare", env, "--archive", str(archive))
    return {"root": root, "env": env, "archive": archive, "n_train": n_train, "prepare_out": out}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_iwslt14_prepare_follows_the_official_script(iwslt):
    prep = iwslt["root"] / "data" / "prepared"
    # title and description texts stay (only their tags go), the long pair is cleaned away:
    # 602 pairs, every 23rd to valid
    kept = 600 + 2
    assert len(read(prep / "train.de")) == kept - kept // 23 and len(read(prep / "valid.de")) == kept // 23
    assert len(read(prep / "train.en")) == len(read(prep / "train.de"))
    # test = dev2010 + TEDX dev2012 + tst2010-2012, 8 segments each, in that order
    test_en = read(prep / "test.en")
    assert len(test_en) == 40 and len(read(prep / "test.raw.en")) == 40
    raw = read(prep / "test.raw.en")
    assert raw[0] == sentence_pairs(8, seed=100)[0][1] and raw[8] == sentence_pairs(8, seed=101)[0][1]
    train_text = " ".join(read(prep / "train.en"))
    assert "<" not in train_text and "talks" not in train_text and "a title" in train_text.replace("@@ ", "")
    assert train_text == train_text.lower()  # lowercased
    assert "&apos;s" in train_text.replace("@@ ", "")  # Moses escaping, like tokenizer.perl
    assert os.path.exists(prep / "code") and read(prep / "code")[0].startswith("#version")


def test_iwslt14_all_stages_and_idempotence(iwslt):
    env = {**iwslt["env"], "MODEL": "gpam", "SEED": "3", "MAX_UPDATE": "4", "EXTRA_ARGS": TINY_NMT,
           "EVAL_ARGS": "--max-len-a 1 --max-len-b 5"}
    assert "already done" in run_stage("iwslt14", "prepare", env, "--archive", str(iwslt["archive"]))
    run_stage("iwslt14", "preprocess", env)
    assert "already done" in run_stage("iwslt14", "preprocess", env)
    out = run_stage("iwslt14", "train", env)
    assert "update" in out
    assert "already done" in run_stage("iwslt14", "train", env)
    run_stage("iwslt14", "evaluate", env)
    run_dir = iwslt["root"] / "runs" / "gpam_base_de-en_postln_seed3"
    result = json.loads((run_dir / "run.json").read_text())
    assert result["attention_type"] == "dagpam" and result["seed"] == 3 and result["direction"] == "de-en"
    assert result["sentences"] == 40 and len(read(run_dir / "hyps.txt")) == 40
    assert read(run_dir / "refs.txt") == [line.lower() for line in read(iwslt["root"] / "data" / "prepared" / "test.raw.en")] or \
        read(run_dir / "refs.txt") == read(iwslt["root"] / "data" / "prepared" / "test.raw.en")
    assert result["bleu_signature"].startswith("nrefs:1|case:lc|")  # lowercased data, lowercased score
    assert result["bleu_tokenized"] is not None
    assert result["train_wps"] > 0 and result["num_updates"] == 4
    # the tiny model: fairseq's parameter count, daGPAM's share exactly one 16 x 16 W_Q- per module
    # (1 encoder self, 1 decoder self, 1 cross attention; d=32, 2 heads)
    from gpam_fairseq.fairseq_glue.tools import build_translation_model
    from helpers import count

    dicts = [len(read(iwslt["root"] / "data" / "data-bin" / f"dict.{lang}.txt")) + 4 for lang in ("de", "en")]
    stock = build_translation_model("transformer_iwslt_de_en", ["--share-decoder-input-output-embed",
                                                                *TINY_NMT.split()[:16]], *dicts)
    assert result["params"] == count(stock.parameters()) + 3 * 16 * 16
    inference = result["inference"]  # fairseq-generate's speed line, the batch settings, device and memory
    assert inference["tool"] == "fairseq-generate" and inference["sentences"] == 40 and inference["beam"] == 5
    assert inference["batch_size"] == 128 and inference["sentences_per_s"] > 0 and inference["tokens_per_s"] > 0
    assert inference["device"].startswith("cpu") and inference["peak_gpu_memory"] == "n/a (CPU)"
    assert inference["peak_gpu_memory_bytes"] is None and inference["peak_rss_bytes"] > 50 * 2 ** 20
    assert "| gpam_fairseq peak_memory |" in (run_dir / "generate.log").read_text()
    assert (run_dir / "tensorboard" / "valid").is_dir()
    assert "already done" in run_stage("iwslt14", "evaluate", env)
    # the score is sacreBLEU of the run folder's files, with the signature it reports
    from sacrebleu.metrics import BLEU, CHRF

    hyps, refs = read(run_dir / "hyps.txt"), read(run_dir / "refs.txt")
    assert result["bleu"] == BLEU(lowercase=True).corpus_score(hyps, [refs]).score
    assert result["chrf"] == CHRF(lowercase=True).corpus_score(hyps, [refs]).score
    # a system that copies the references (fairseq-generate --score-reference) through the same
    # stage (generate, detokenise, score against the untokenised test set) scores 100; its
    # outputs shuffled across sentences far less
    copy_env = {**env, "FORCE": "1", "EVAL_ARGS": "--score-reference"}
    run_stage("iwslt14", "evaluate", copy_env)
    copied = json.loads((run_dir / "run.json").read_text())
    assert copied["bleu"] == pytest.approx(100.0) and copied["chrf"] == pytest.approx(100.0)
    assert copied["bleu_tokenized"] == pytest.approx(100.0)
    copy_hyps = read(run_dir / "hyps.txt")
    assert BLEU(lowercase=True).corpus_score(copy_hyps[1:] + copy_hyps[:1], [refs]).score < 20
    run_stage("iwslt14", "evaluate", {**env, "FORCE": "1"})  # the trained system's run.json again
    assert json.loads((run_dir / "run.json").read_text())["bleu"] == result["bleu"]
    pytest.iwslt_run = run_dir


# --- parallel data stays aligned --------------------------------------------------------------

ONE_SIDED = {  # pair index -> (German, English) additions that only one side has
    3: (" siehe <url>", ""),                       # a sentence that mentions a tag: a sentence, not metadata
    7: (" mehr dazu gibt es auf der seite im netz", " see <url>http://ted.com</url> now"),  # a url element inside a sentence
    11: ("", " <keywords> matter"),
    15: (" die <talkid> fehlt", ""),
    19: ("\r", ""),                                # a stray carriage return inside the line
}


def make_aligned_iwslt14_archive(path, drop_en=None, shift_metadata=False):
    """de-en.tgz in the real layout, three talks with their metadata headers; every line that
    is not metadata carries an id token (id0000, ...; talk t's title id9t00, its description id9t01; test sets id8...) on both
    sides, so that the pairs can be checked after preprocessing. Some sentences mention <url>,
    <keywords> or <talkid> on one side only; one German line has a stray carriage return.
    drop_en: leave out the English line of that pair (a misaligned corpus, the counts differ);
    shift_metadata: the English <keywords> line of the second talk moves one line down (same
    counts, misaligned metadata)."""
    pairs = sentence_pairs(90, seed=7, min_len=6, max_len=9)
    sides = {"de": [], "en": []}
    ids = []
    for talk in range(3):
        header = {"de": [f"<url>http://www.ted.com/talks/{talk}.html</url>", f"<keywords>talks, x{talk}</keywords>",
                         f"<talkid>{talk}</talkid>", f"<title>Ein Titel id9{talk}00</title>",
                         f"<description>Beschreibung id9{talk}01</description>"],
                  "en": [f"<url>http://www.ted.com/talks/{talk}.html</url>", f"<keywords>talks, x{talk}</keywords>",
                         f"<talkid>{talk}</talkid>", f"<title>A title id9{talk}00</title>",
                         f"<description>About id9{talk}01</description>"]}
        body = {"de": [], "en": []}
        for i in range(30 * talk, 30 * (talk + 1)):
            de_extra, en_extra = ONE_SIDED.get(i, ("", ""))
            de, en = pairs[i]
            if de_extra == "\r":
                words = de.split(" ")
                de, de_extra = " ".join(words[:2]) + "\r" + " ".join(words[2:]), ""
            body["de"].append(f"{de}{de_extra} id{i:04d}")
            if i != drop_en:
                body["en"].append(f"{en}{en_extra} id{i:04d}")
        if shift_metadata and talk == 1:
            header["en"].remove(f"<keywords>talks, x{talk}</keywords>")
            header["en"].insert(4, f"<keywords>talks, x{talk}</keywords>")
            header["en"].insert(3, body["en"].pop(0))  # the first sentence moves up in its place
        for lang in ("de", "en"):
            sides[lang] += header[lang] + body[lang]
        ids += [f"id9{talk}00", f"id9{talk}01"] + [f"id{i:04d}" for i in range(30 * talk, 30 * (talk + 1))]
    with tarfile.open(path, "w:gz") as tar:
        for k, lang in enumerate(("de", "en")):
            add_file(tar, f"de-en/train.tags.de-en.{lang}", "\n".join(sides[lang]) + "\n")
            for j, name in enumerate(("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                                      "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")):
                test = [(f"{de} id8{j}{n:02d}", f"{en} id8{j}{n:02d}") for n, (de, en) in enumerate(sentence_pairs(4, seed=50 + j))]
                add_file(tar, f"de-en/{name}.de-en.{lang}.xml",
                         seg_file([p[k] for p in test], "refset" if lang == "en" else "srcset", lang))
    return ids


def binarised_pairs(data_bin, split):
    """Both sides of a binarised split as text, BPE removed (what fairseq-train will read)."""
    from fairseq.data import Dictionary, data_utils

    out = {}
    for lang in ("de", "en"):
        d = Dictionary.load(str(data_bin / f"dict.{lang}.txt"))
        ds = data_utils.load_indexed_dataset(str(data_bin / f"{split}.de-en.{lang}"), d)
        out[lang] = [d.string(ds[i], bpe_symbol="subword_nmt") for i in range(len(ds))]
    return list(zip(out["de"], out["en"]))


def id_token(line):
    (token,) = re.findall(r"\bid\d{4}\b", line)
    return token


def test_iwslt14_pairs_stay_aligned_through_prepare_and_preprocess(tmp_path):
    archive = tmp_path / "de-en.tgz"
    ids = make_aligned_iwslt14_archive(str(archive))
    env = dirs_env(tmp_path)
    run_stage("iwslt14", "prepare", env, "--archive", str(archive))
    run_stage("iwslt14", "preprocess", env)
    data_bin = tmp_path / "data" / "data-bin"
    train = binarised_pairs(data_bin, "train")
    for de, en in train:
        assert id_token(de) == id_token(en), (de, en)
    # ids of valid and test lines are words the training dictionary lacks (<unk> once binarised):
    # check their text, and that the binarised splits have as many pairs
    prep = tmp_path / "data" / "prepared"
    valid, test = ([(de.replace("@@ ", ""), en.replace("@@ ", "")) for de, en in zip(read(prep / f"{split}.de"),
                                                                                    read(prep / f"{split}.en"))]
                   for split in ("valid", "test"))
    assert len(binarised_pairs(data_bin, "valid")) == len(valid) and len(binarised_pairs(data_bin, "test")) == len(test)
    for de, en in valid + test:
        assert id_token(de) == id_token(en), (de, en)
    # every training line that is not metadata survives, once: the mentions of <url>, <keywords>,
    # <talkid> are sentences, the carriage return did not split its line
    assert sorted(id_token(de) for de, _ in train + valid) == sorted(ids)
    assert len(test) == 20
    by_id = {id_token(de): (de, en) for de, en in train + valid}
    assert "&lt; url &gt;" in by_id["id0003"][0] and "http" in by_id["id0007"][1]
    assert "&lt; keywords &gt;" in by_id["id0011"][1] and "&lt; talkid &gt;" in by_id["id0015"][0]
    de, en = by_id["id0019"]  # the carriage return became a space: as many words as the English ("'s" aside)
    assert "\r" not in de and len(de.split()) + 1 == len(en.split())
    assert by_id["id9000"][1] == "a title id9000"  # title text kept, its tags stripped
    assert not [line for pair in train + valid for line in pair if "ted.com/talks" in line or "x1" in line]


def last_stderr_line(proc):
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize("case", ["dropped_line", "shifted_metadata"])
def test_iwslt14_misaligned_tag_files_stop_with_one_line(tmp_path, case):
    archive = tmp_path / "de-en.tgz"
    make_aligned_iwslt14_archive(str(archive), drop_en=40 if case == "dropped_line" else None,
                                 shift_metadata=case == "shifted_metadata")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "iwslt14", "prepare.py"), "--archive", str(archive)],
                          capture_output=True, text=True, env={**os.environ, **dirs_env(tmp_path)}, cwd=REPO)
    assert proc.returncode != 0
    last = last_stderr_line(proc)
    de = str(tmp_path / "data" / "orig" / "de-en" / "train.tags.de-en.de")
    en = str(tmp_path / "data" / "orig" / "de-en" / "train.tags.de-en.en")
    assert last.startswith("iwslt14/prepare: train tag files: ") and de in last and en in last, proc.stderr[-2000:]
    if case == "dropped_line":  # 3 talks x (5 header lines + 30 sentences), one English line missing
        assert f"{de} has 105 lines but {en} has 104" in last
    else:  # talk 2, line 38: the German <talkid> line faces the English title
        assert f"line 38 is a metadata line (<url>, <talkid>, <keywords>) in {de} but a sentence in {en}" in last


@pytest.mark.parametrize("step", ["moses_tokenize", "lowercase_file", "apply_bpe"])
def test_iwslt14_every_one_sided_step_is_checked(tmp_path, monkeypatch, step):
    """A step that loses a line of one side stops the prepare stage with one line naming both files."""
    from gpam_fairseq.recipes import preparation, text
    from gpam_fairseq.recipes.common import RecipeError

    archive = tmp_path / "de-en.tgz"
    make_aligned_iwslt14_archive(str(archive))
    module = preparation if step == "lowercase_file" else text
    original = getattr(module, step)
    out_arg = {"moses_tokenize": 1, "lowercase_file": 1, "apply_bpe": 2}[step]

    def lossy(*args, **kwargs):
        original(*args, **kwargs)
        out = args[out_arg]
        if out.endswith(".en") and "train" in os.path.basename(out):
            with open(out, encoding="utf-8") as f:
                lines = f.readlines()
            with open(out, "w", encoding="utf-8") as f:
                f.writelines(lines[:-1])

    monkeypatch.setattr(module, step, lossy)
    monkeypatch.setenv("WORKERS", "1")
    sources = preparation.Sources(str(tmp_path / "data" / "orig"), [str(archive)])
    with pytest.raises(RecipeError) as err:
        preparation.prepare_iwslt14(str(tmp_path / "data"), sources, bpe_tokens=200)
    message = str(err.value)
    assert "\n" not in message and re.search(r"has [\d,]+ lines but \S+\.en has [\d,]+", message), message
    assert {"moses_tokenize": "tokenisation", "lowercase_file": "lowercasing", "apply_bpe": "BPE of train"}[step] in message


def test_wmt16_misaligned_split_stops_with_one_line(tmp_path):
    pairs = sentence_pairs(12, seed=31)
    files = {}
    for split in ("train.tok.clean.bpe.32000", "newstest2013.tok.bpe.32000", "newstest2014.tok.bpe.32000"):
        files[f"{split}.en"] = "".join(p[1] + "\n" for p in pairs)
        files[f"{split}.de"] = "".join(p[0] + "\n" for p in pairs[:-1 if split.startswith("train") else None])
    make_tgz(tmp_path / "wmt16_en_de.tar.gz", files)
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "wmt14_en_de", "prepare.py"), "--archive",
                           str(tmp_path / "wmt16_en_de.tar.gz")], capture_output=True, text=True,
                          env={**os.environ, **dirs_env(tmp_path, SETUP="scaling_nmt")}, cwd=REPO)
    prep = tmp_path / "data" / "prepared"
    assert proc.returncode != 0
    assert last_stderr_line(proc) == (f"wmt14_en_de/prepare: train data of wmt16_en_de.tar.gz: {prep / 'train.en'} has 12 "
                                      f"lines but {prep / 'train.de'} has 11; the two sides of a parallel corpus must "
                                      f"have one line per sentence pair: check the input files")


def test_preprocess_stage_checks_the_prepared_pairs(tmp_path):
    from gpam_fairseq.recipes.common import RecipeError
    from gpam_fairseq.recipes.definitions import RECIPES
    from gpam_fairseq.recipes.text import check_preprocess_inputs

    for split, n in (("train", 5), ("valid", 2), ("test", 2)):
        (tmp_path / f"{split}.de").write_text("a\n" * n)
        (tmp_path / f"{split}.en").write_text("a\n" * (n + (split == "valid")))
    with pytest.raises(RecipeError, match=r"fairseq-preprocess --validpref: .*valid\.de has 2 lines but .*valid\.en has 3"):
        check_preprocess_inputs(RECIPES["iwslt14"].preprocess(str(tmp_path)))
    check_preprocess_inputs(RECIPES["ptb"].preprocess(str(tmp_path)))  # a language model has one side


def test_iwslt14_baseline_is_the_stock_architecture_pre_ln_en_de(iwslt):
    env = {**iwslt["env"], "MODEL": "baseline", "LN": "pre", "DIRECTION": "en-de", "MAX_UPDATE": "1",
           "EXTRA_ARGS": TINY_NMT}
    run_stage("iwslt14", "preprocess", env)
    run_stage("iwslt14", "train", env)
    run_dir = iwslt["root"] / "runs" / "baseline_base_en-de_preln_seed1"
    cmd = json.loads((run_dir / ".train.done").read_text())["command"]
    assert cmd[cmd.index("--arch") + 1] == "transformer_iwslt_de_en"
    assert "--attention-type" not in cmd
    assert {"--encoder-normalize-before", "--decoder-normalize-before"} <= set(cmd)
    assert cmd[cmd.index("--source-lang") + 1] == "en" and cmd[cmd.index("--target-lang") + 1] == "de"


def test_iwslt14_controls_have_daGPAMs_parameters_and_twice_the_heads(iwslt):
    """MODEL=baseline_params and baseline_maps through fairseq-train, shrunk by EXTRA_ARGS like the gpam run
    of test_iwslt14_all_stages_and_idempotence: fairseq's own parameter counts."""
    from gpam_fairseq.recipes.stages import training_figures

    gpam = json.loads((pytest.iwslt_run / "run.json").read_text())
    counts, controls = {}, {}
    for model in ("baseline_params", "baseline_maps"):
        env = {**iwslt["env"], "MODEL": model, "SEED": "3", "MAX_UPDATE": "1", "EXTRA_ARGS": TINY_NMT,
               "GPAM_ARGS": "--gpam-lambda-pos 0.5"}  # read by baseline_params' matching, no parameters of its own
        out = run_stage("iwslt14", "train", env)
        run_dir = iwslt["root"] / "runs" / f"{model}_base_de-en_postln_seed3"
        done = json.loads((run_dir / ".train.done").read_text())
        counts[model], controls[model] = training_figures(str(run_dir))["params"], done["control"]
        assert "--attention-type" not in done["command"] and "--gpam-lambda-pos" not in done["command"]
        if model == "baseline_params":
            assert done["command"][-4:] == ["--encoder-ffn-embed-dim", "70", "--decoder-ffn-embed-dim", "70"]
            assert "encoder FFN 64 -> 70, decoder FFN 64 -> 70 (+6 units): +780 parameters for daGPAM's +768" in out
        else:
            assert done["command"][-4:] == ["--encoder-attention-heads", "4", "--decoder-attention-heads", "4"]
            assert "(head dim 8)" in out
    extra = controls["baseline_params"]["extra_dagpam"]
    assert extra == 3 * 16 * 16  # one shared 16 x 16 W_Q- in each of the 3 attention blocks (d=32, 2 heads)
    assert abs(counts["baseline_params"] - gpam["params"]) / gpam["params"] < 1e-3
    assert counts["baseline_params"] - gpam["params"] == 12
    assert counts["baseline_maps"] == gpam["params"] - extra  # the stock model's count: heads add no parameters


def test_wikitext103_all_stages_default_size_adaptive_inputs(tmp_path):
    """The paper's 8-layer adaptive-input size, shrunk; cutoffs lowered to the fixture's vocabulary."""
    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(60)] + ["<unk>", "the", "of", ",", "."]

    def article(n):
        lines = [" ", f" = {rng.choice(vocab)} {rng.choice(vocab)} = ", " "]
        lines += [" " + " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 20))) + " " for _ in range(n)]
        return "\n".join(lines) + "\n"

    archive = tmp_path / "wikitext-103-v1.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for split, n in (("train", 150), ("valid", 20), ("test", 20)):
            z.writestr(f"wikitext-103/wiki.{split}.tokens", article(n))
    env = dirs_env(tmp_path, MAX_UPDATE="3", EXTRA_ARGS=(
        "--decoder-layers 1 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "
        "--adaptive-input-cutoff 20,40 --adaptive-softmax-cutoff 20,40 --tokens-per-sample 32 --max-tokens 512 "
        "--warmup-updates 2 --no-epoch-checkpoints --log-interval 2"),
        EVAL_ARGS="--tokens-per-sample 32 --context-window 16 --softmax-batch 64")
    # a fixture, not the published wikitext-103-v1.zip: --no-verify (provenance records it so)
    run_stage("wikitext103", "prepare", env, "--archive", str(archive), "--no-verify")
    prep = tmp_path / "data" / "prepared"
    assert read(prep / "test.txt")[1].startswith(" = ")  # the wikitext layout, unchanged
    run_stage("wikitext103", "preprocess", env)
    assert (tmp_path / "data" / "data-bin" / "dict.txt").exists()
    run_stage("wikitext103", "train", env)
    run_stage("wikitext103", "evaluate", env)
    run_dir = tmp_path / "runs" / "gpam_8layer_seed1"
    cmd = json.loads((run_dir / ".train.done").read_text())["command"]
    assert cmd[cmd.index("--arch") + 1] == "transformer_lm_gpam_wiki103_8layer"
    assert "adaptive_loss" in cmd and "--ddp-backend" in cmd
    result = json.loads((run_dir / "run.json").read_text())
    assert result["attention_type"] == "dagpam" and result["task"] == "language_modeling"
    (used,) = result["data_provenance"]["files"]  # the bytes the run trained on, recorded in its run folder
    assert used["file"] == "wikitext-103-v1.zip" and used["origin"] == str(archive) and used["verified"] == "no (--no-verify)"
    assert used["sha256"] == __import__("hashlib").sha256(archive.read_bytes()).hexdigest()
    assert 1 < result["perplexity"] < 1000 and result["params"] > 0 and result["num_updates"] == 3
    inference = result["inference"]
    assert inference["tool"] == "fairseq-eval-lm" and inference["tokens"] > 0 and inference["tokens_per_s"] > 0
    assert inference["batch_size"] == 2 and inference["tokens_per_sample"] == 32 and inference["context_window"] == 16
    assert inference["peak_gpu_memory"] == "n/a (CPU)" and inference["peak_rss_bytes"] > 50 * 2 ** 20


def make_tgz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            add_file(tar, name, text)


def test_wmt14_icml17_prepare_and_preprocess(tmp_path):
    archives = []
    for k, (name, stem) in enumerate((("training-parallel-europarl-v7.tgz", "training/europarl-v7.de-en"),
                                      ("training-parallel-commoncrawl.tgz", "commoncrawl.de-en"),
                                      ("training-parallel-nc-v9.tgz", "training/news-commentary-v9.de-en"))):
        pairs = sentence_pairs(150, seed=10 + k)
        pairs[0] = ("Ein \u00abZitat\u00bb\u200b mit Bindestrich-Wort", "A \u00abquote\u00bb\u200b with hyphen-word")
        make_tgz(tmp_path / name, {f"{stem}.de": "".join(p[0] + "\n" for p in pairs),
                                   f"{stem}.en": "".join(p[1] + "\n" for p in pairs)})
        archives += ["--archive", str(tmp_path / name)]
    test = sentence_pairs(12, seed=20)
    make_tgz(tmp_path / "test-full.tgz", {
        "test-full/newstest2014-deen-src.en.sgm": seg_file([p[1] for p in test], "srcset", "en"),
        "test-full/newstest2014-deen-ref.de.sgm": seg_file([p[0] for p in test], "refset", "de")})
    env = dirs_env(tmp_path)
    run_stage("wmt14_en_de", "prepare", env, *archives, "--archive", str(tmp_path / "test-full.tgz"), "--no-verify")
    prep = tmp_path / "data" / "prepared"
    assert len(read(prep / "valid.en")) == 450 // 100 and len(read(prep / "test.de")) == 12
    assert read(prep / "test.raw.de") == [p[0] for p in test]  # untokenised references for sacreBLEU
    train = " ".join(read(prep / "train.en")).replace("@@ ", "")
    assert "hyphen @-@ word" in train  # tokenizer.perl -a
    assert "\u00ab" not in train and "\u200b" not in train  # normalize-punctuation + remove-non-printing-char
    run_stage("wmt14_en_de", "preprocess", env)
    data_bin = tmp_path / "data" / "data-bin"
    assert (data_bin / "dict.en.txt").read_text() == (data_bin / "dict.de.txt").read_text()  # joined


def test_wmt16_scaling_nmt_setup_prepare_and_preprocess(tmp_path):
    pairs = sentence_pairs(40, seed=30)
    files = {}
    for split, n in (("train.tok.clean.bpe.32000", 40), ("newstest2013.tok.bpe.32000", 5), ("newstest2014.tok.bpe.32000", 6)):
        files[f"{split}.en"] = "".join(p[1] + "\n" for p in pairs[:n])
        files[f"{split}.de"] = "".join(p[0] + "\n" for p in pairs[:n])
    files["newstest2014.de"] = "".join(p[0] + "\n" for p in pairs[:6])
    make_tgz(tmp_path / "wmt16_en_de.tar.gz", files)
    env = dirs_env(tmp_path, SETUP="scaling_nmt")
    run_stage("wmt14_en_de", "prepare", env, "--archive", str(tmp_path / "wmt16_en_de.tar.gz"))
    run_stage("wmt14_en_de", "preprocess", env)
    prep = tmp_path / "data" / "prepared"
    assert len(read(prep / "test.en")) == 6 and len(read(prep / "test.raw.de")) == 6
    data_bin = tmp_path / "data" / "data-bin"
    assert (data_bin / "dict.en.txt").read_text() == (data_bin / "dict.de.txt").read_text()
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "wmt14_en_de", "prepare.py")],
                          capture_output=True, text=True, env={**os.environ, **dirs_env(tmp_path, SETUP="wmt99")})
    assert proc.returncode != 0 and "SETUP='wmt99': choose from icml17, scaling_nmt" in proc.stderr


def test_enwik8_prepare_and_preprocess(tmp_path):
    rng = random.Random(7)
    data = "".join(rng.choice("abc <page>\u00e9\n") for _ in range(3000)).encode("utf-8")
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8", data)
    env = dirs_env(tmp_path, ENWIK8_HELDOUT_BYTES="500")
    run_stage("enwik8", "prepare", env, "--archive", str(archive), "--no-verify")
    prep = tmp_path / "data" / "prepared"
    # prep_enwik8.py: one token per byte (its value), newlines end lines; last 2 x 500 bytes held out
    tokens = {s: [list(map(int, line.split())) for line in read(prep / f"{s}.txt")] for s in ("train", "valid", "test")}
    assert b"\n".join(bytes(t) for t in tokens["test"]) == data[-500:]
    assert b"\n".join(bytes(t) for t in tokens["valid"]) == data[-1000:-500]
    assert b"\n".join(bytes(t) for t in tokens["train"]) == data[:-1000]
    run_stage("enwik8", "preprocess", env)
    assert (tmp_path / "data" / "data-bin" / "test.bin").exists()


def test_ptb_prepare_and_preprocess_from_text_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 50), ("valid", 5), ("test", 5)):
        (raw / f"ptb.{split}.txt").write_text("".join(f" the <unk> company said N {i} \n" for i in range(n)))
    env = dirs_env(tmp_path)
    run_stage("ptb", "prepare", env, "--raw-dir", str(raw), "--no-verify")
    assert read(tmp_path / "data" / "prepared" / "valid.txt") == read(raw / "ptb.valid.txt")
    run_stage("ptb", "preprocess", env)
    assert "company 50" in (tmp_path / "data" / "data-bin" / "dict.txt").read_text().splitlines()
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "ptb", "prepare.py"), "--raw-dir", str(tmp_path / "no")],
                          capture_output=True, text=True, env={**os.environ, **dirs_env(tmp_path / "x")})
    assert proc.returncode != 0 and "--raw-dir" in proc.stderr and "no such directory" in proc.stderr


def _size_fields(args):
    names = ("decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
             "decoder_normalize_before", "dropout", "attention_dropout", "adaptive_input", "adaptive_softmax_cutoff",
             "share_decoder_input_output_embed", "tie_adaptive_weights", "no_decoder_final_norm")
    return {n: getattr(args, n, None) for n in names}


@pytest.mark.parametrize("recipe,size", [("wikitext103", "8layer"), ("wikitext103", "16layer"), ("wikitext103", "base"),
                                         ("enwik8", "12layer"), ("ptb", "15layer")])
def test_named_lm_sizes_equal_their_stock_baseline(recipe, size):
    """MODEL=gpam and MODEL=baseline of a recipe build models of the same shape (Pre-LN for named ones)."""
    from gpam_fairseq.fairseq_glue.tools import parse_training_args
    from gpam_fairseq.recipes.definitions import RECIPES

    s = RECIPES[recipe].sizes[size]
    gpam, _ = parse_training_args(["--task", "language_modeling", *s.gpam])
    stock, _ = parse_training_args(["--task", "language_modeling", *s.baseline])
    assert _size_fields(gpam) == _size_fields(stock)
    if size != "base":
        assert gpam.decoder_normalize_before is True  # named LM archs: fairseq's base_lm_architecture forces Pre-LN
    if recipe == "wikitext103" and size == "8layer":
        assert gpam.decoder_layers == 8


def test_ptb_gpam_adds_only_the_dagpam_parameters():
    from gpam_fairseq.recipes.definitions import RECIPES
    from helpers import build_language_model, count, gpam_parameter_share

    s = RECIPES["ptb"].sizes["15layer"]
    stock = build_language_model(s.baseline[1], s.baseline[2:], vocab=10000)
    ours = build_language_model(s.gpam[1], [*s.gpam[2:], "--attention-type", "softmax"], vocab=10000)
    gpam = build_language_model(s.gpam[1], s.gpam[2:], vocab=10000)
    assert count(ours.parameters()) == count(stock.parameters())
    extra, total, share = gpam_parameter_share(gpam)
    assert extra == 15 * 64 * 64 and total == count(stock.parameters()) + extra and 0.1 < share < 0.84


def test_compound_split_as_scaling_nmt():
    from gpam_fairseq.recipes.stages import compound_split

    assert compound_split("a well-known long-term x - y") == "a well ##AT##-##AT## known long ##AT##-##AT## term x - y"


def _all_sizes():
    from gpam_fairseq.recipes.definitions import RECIPES

    return [(r, s, (r.setups or (None,))[0]) for r in RECIPES.values() for s in r.sizes]


@pytest.mark.parametrize("recipe,size,setup", _all_sizes(), ids=lambda v: getattr(v, "name", v))
def test_every_train_command_parses_with_fairseq(recipe, size, setup, monkeypatch, tmp_path):
    """Each recipe's fairseq-train line (baseline, gpam, any other --attention-type) is accepted by
    fairseq's own parser; baseline and gpam differ only in the architecture and attention flags."""
    from gpam_fairseq.fairseq_glue.tools import parse_training_args
    from gpam_fairseq.recipes.stages import Settings, train_command

    monkeypatch.setenv("NGPUS", "8")
    monkeypatch.setenv("SIZE", size)
    monkeypatch.setenv("LN", "pre")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    commands = {}
    for model in ("baseline", "gpam", "softmax"):
        monkeypatch.setenv("MODEL", model)
        cmd, gpus, update_freq = train_command(Settings(recipe))
        commands[model] = cmd
    for model in ("baseline", "gpam"):
        args, _ = parse_training_args(commands[model][2:])  # drop the executable and the data folder
        assert args.seed == 1 and args.tensorboard_logdir and args.fp16
        assert args.update_freq == [max(1, recipe.sizes[size].gpu_steps // 8)]
        if model == "baseline":
            assert args.arch == recipe.sizes[size].baseline[1] and not hasattr(args, "attention_type")
        else:
            assert args.arch == recipe.sizes[size].gpam[1] and args.attention_type == "dagpam"
    softmax = commands["softmax"]
    assert softmax[softmax.index("--attention-type") + 1] == "softmax"
    strip = {"--arch", "--attention-type", *recipe.sizes[size].baseline, *recipe.sizes[size].gpam, "dagpam"}
    shared = [[c for c in commands[m] if c not in strip and "/" not in c] for m in ("baseline", "gpam")]
    assert shared[0] == shared[1]


def test_attention_type_is_validated_by_fairseq(monkeypatch, tmp_path):
    from gpam_fairseq.fairseq_glue.tools import parse_training_args
    from gpam_fairseq.recipes.definitions import RECIPES
    from gpam_fairseq.recipes.stages import Settings, train_command

    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MODEL", "no_such_attention")  # the recipe passes it on, fairseq's argparse refuses it
    with pytest.raises(SystemExit):
        parse_training_args(train_command(Settings(RECIPES["iwslt14"]))[0][2:])
