#!/usr/bin/env python
"""Write the demo's synthetic parallel corpus (a toy task: word mapping + reversal).

    python examples/quickstart/synthetic_corpus.py OUT_DIR [--train 20000] [--seed 1]

writes OUT_DIR/{train,valid,test}.{src,tgt}; the generator is gpam_fairseq/recipes/synthetic_corpus.py.
"""
from gpam_fairseq.recipes.synthetic_corpus import main

if __name__ == "__main__":
    main()
