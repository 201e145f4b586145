"""LICENSE, CITATION.cff and setup.py agree: MIT, version 0.1.0, and the paper the code implements."""

import os
import re

import yaml

import gpam_fairseq
from helpers import REPO

ARXIV_ID = "2410.15578"
PAPER_TITLE = "Generalized Probabilistic Attention Mechanism in Transformers"


def citation():
    with open(os.path.join(REPO, "CITATION.cff"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def setup_py():
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        return f.read()


def named(person):
    return person.get("name") or person.get("family-names")


def test_citation_has_the_keys_cff_1_2_0_requires():
    cff = citation()
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title"):
        assert isinstance(cff[key], str) and cff[key].strip(), key
    assert cff["authors"] and all(named(a) for a in cff["authors"])


def test_citation_describes_this_software_at_the_installed_version():
    cff = citation()
    assert cff.get("type", "software") == "software"
    assert "gpam_fairseq" in cff["title"]
    version = re.search(r'version="([^"]+)"', setup_py()).group(1)
    assert str(cff["version"]) == version == gpam_fairseq.__version__ == "0.1.0"
    assert cff["license"] == "MIT"


def test_citation_points_to_the_paper_it_implements():
    cff = citation()
    papers = [cff["preferred-citation"]] + [r for r in cff.get("references", []) if r.get("title") == PAPER_TITLE]
    assert len(papers) == 2  # the preferred citation and the same paper among the references
    for paper in papers:
        assert paper["type"] == "article" and paper["title"] == PAPER_TITLE
        assert [a["family-names"] for a in paper["authors"]] == ["Heo", "Choi"]
        assert paper["year"] == 2024
        assert ARXIV_ID in paper["url"]


def test_license_is_mit_everywhere():
    with open(os.path.join(REPO, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the gpam_fairseq authors" in text
    assert 'license="MIT"' in setup_py()
