"""A small synthetic parallel corpus on which attention matters (offline, deterministic).

Each source sentence is a random string of pseudo-words; its translation maps every word
through a fixed bijective dictionary and *reverses the word order*. A model can only do
this by attending from each target position to the mirrored source position, so the
task exercises exactly the mechanism we swap (and a model without working attention
scores near zero BLEU). It is a toy task, and every output that uses it says so.
Used by ``make demo``, ``scripts/gpu_checks.py`` and the tests.

    python examples/quickstart/synthetic_corpus.py OUT_DIR [--train 20000] [--seed 1]
    python -m gpam_fairseq.recipes.synthetic_corpus OUT_DIR [--train 20000] [--seed 1]

writes OUT_DIR/{train,valid,test}.{src,tgt}.
"""

import argparse
import os
import random
from typing import Dict, List, Tuple

SRC_LANG, TGT_LANG = "src", "tgt"
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def build_lexicon(size: int, rng: random.Random) -> Dict[str, str]:
    """size source pseudo-words (CV syllable pairs) mapped one-to-one to target ones (CVC)."""
    sources = sorted({rng.choice(CONSONANTS) + rng.choice(VOWELS) + rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(size * 20)})
    targets = sorted({rng.choice(CONSONANTS).upper() + rng.choice(VOWELS) + rng.choice(CONSONANTS) for _ in range(size * 20)})
    if len(sources) < size or len(targets) < size:
        raise ValueError(f"cannot draw {size} distinct pseudo-words; use a smaller --vocab")
    rng.shuffle(sources)
    rng.shuffle(targets)
    return dict(zip(sources[:size], targets[:size]))


def translate(words: List[str], lexicon: Dict[str, str]) -> List[str]:
    return [lexicon[w] for w in reversed(words)]


def make_pairs(n: int, lexicon: Dict[str, str], rng: random.Random, min_len: int, max_len: int) -> List[Tuple[str, str]]:
    vocab = sorted(lexicon)
    pairs = []
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randint(min_len, max_len))]
        pairs.append((" ".join(words), " ".join(translate(words, lexicon))))
    return pairs


def write_corpus(
    out_dir: str,
    n_train: int = 20000,
    n_valid: int = 500,
    n_test: int = 500,
    vocab: int = 60,
    min_len: int = 3,
    max_len: int = 12,
    seed: int = 1,
) -> Dict[str, str]:
    """Write the splits; returns {split: path prefix}. Same arguments, same files."""
    rng = random.Random(seed)
    lexicon = build_lexicon(vocab, rng)
    os.makedirs(out_dir, exist_ok=True)
    prefixes = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        pairs = make_pairs(n, lexicon, rng, min_len, max_len)
        prefix = os.path.join(out_dir, split)
        for side, lang in ((0, SRC_LANG), (1, TGT_LANG)):
            with open(f"{prefix}.{lang}", "w", encoding="utf-8") as f:
                f.writelines(p[side] + "\n" for p in pairs)
        prefixes[split] = prefix
    return prefixes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--valid", type=int, default=500)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--vocab", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    write_corpus(args.out_dir, args.train, args.valid, args.test, args.vocab, seed=args.seed)
    print(f"synthetic corpus (toy task: word mapping + reversal) written to {args.out_dir}")


if __name__ == "__main__":
    main()
