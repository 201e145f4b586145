"""The documentation: a short README, links that resolve, quotes that match, self-contained text.

Pure Python and fast (no fairseq, no torch): README.md has at most 250 lines; every relative
Markdown link in README.md, docs/**/*.md and examples/**/README.md points to an existing file,
and a ``#anchor`` to a heading of that file (GitHub's slug rules); the lines the README quotes
from gpam_fairseq/attention/fused.py are in that file; and no tracked file refers to
internal notes or tracker numbers instead of stating the fact.
"""

import os
import re
import subprocess
import unicodedata
from functools import lru_cache

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
MAX_README_LINES = 250

# Words that point at material outside the repository. Built from pieces so that this file
# does not match itself.
FORBIDDEN = re.compile("|".join(["err" + "ata", "gpam" + "_method", "project" + " notes", "issue" + r" [0-9]"]), re.I)


def git_files(*extra):
    """Files git knows: tracked ones, plus with ``--others --exclude-standard`` untracked, not ignored ones."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", *extra], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree instead
        found = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "runs", "data")]
            found += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
        return sorted(found)
    return sorted(p for p in out.decode("utf-8").split("\0") if p)


def tracked_files():
    return git_files()


def markdown_files():
    """README.md, docs/**/*.md and examples/**/README.md, tracked or new (not ignored)."""
    paths = set(git_files()) | set(git_files("--others", "--exclude-standard"))
    keep = [
        p
        for p in paths
        if p == "README.md"
        or (p.startswith("docs/") and p.endswith(".md"))
        or (p.startswith("examples/") and os.path.basename(p) == "README.md")
    ]
    return sorted(p for p in keep if os.path.isfile(os.path.join(REPO, p)))


# ----------------------------------------------------------------------------- Markdown parsing

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the text may hold one level of brackets or code spans
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text):
    """The lines outside fenced code blocks, with their 1-based numbers."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def links(text):
    """(line number, target) of every Markdown link outside code."""
    for number, line in prose_lines(text):
        line = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line)  # no links inside code spans
        for m in LINK.finditer(line):
            yield number, m.group(1)


def slug(heading):
    """GitHub's anchor of a heading: text only, lowercased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)  # code spans: their content
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "").replace("~", "")  # emphasis, strikethrough (underscores stay)
    text = text.strip().lower()
    kept = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path):
    """Every anchor GitHub generates for the headings of a Markdown file (duplicates get -1, -2, ...)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen, result = {}, set()
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return frozenset(result)


def test_slug_follows_github_rules():
    assert slug("What the paper leaves open, and what we chose") == "what-the-paper-leaves-open-and-what-we-chose"
    assert slug("Comparing runs: `scripts/compare_runs.py`") == "comparing-runs-scriptscompare_runspy"
    assert slug("GPU: one H100, measured once (2026-11-27)") == "gpu-one-h100-measured-once-2026-11-27"
    assert slug("The paper's controlled experiment (PTB, 15 layers)") == "the-papers-controlled-experiment-ptb-15-layers"
    assert slug("daGPAM scalars in tensorboard") == "dagpam-scalars-in-tensorboard"
    assert slug("Exact resume, bad input, soak") == "exact-resume-bad-input-soak"


# ----------------------------------------------------------------------------- the tests


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"


@pytest.mark.parametrize("md", markdown_files())
def test_relative_links_resolve(md):
    path = os.path.join(REPO, md)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    broken = []
    for number, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        if not os.path.exists(dest):
            broken.append(f"{md}:{number}: {target} (no such file)")
            continue
        if anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{md}:{number}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_quotes_functional_py_verbatim():
    """The fused path the README quotes is code of fused.py, line by line (comments aside)."""
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    quoted = [b for b in blocks if "fused_attention(" in b]
    assert quoted, "the README no longer quotes the fused path of fused.py"
    with open(os.path.join(REPO, "gpam_fairseq", "attention", "fused.py"), encoding="utf-8") as f:
        source = {line.strip() for line in f}
    for line in quoted[0].splitlines():
        code = line.split("#", 1)[0].strip()
        assert not code or code in source, f"README quotes a line that is not in fused.py: {code!r}"


def test_no_references_to_internal_notes():
    hits = []
    for rel in tracked_files():
        path = os.path.join(REPO, rel)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):  # binary files (PNG, ...)
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{rel}:{number}: {line.strip()[:120]}")
    assert not hits, "say the fact itself instead of pointing at notes or tracker numbers:\n" + "\n".join(hits)
