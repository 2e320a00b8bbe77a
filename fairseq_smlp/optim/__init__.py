"""Optimizers the plugin gives fairseq (fairseq_patches.py wires them in)."""
