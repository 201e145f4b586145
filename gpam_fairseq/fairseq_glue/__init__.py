"""Driving fairseq: what the plugin repairs or adds in fairseq when imported (compatibility fixes,
one-line errors, --bf16) and the helpers that run its console scripts and read their logs."""
