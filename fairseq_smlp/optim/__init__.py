"""Optimizers the plugin gives fairseq (cpu_adamw.py) and what it adds to fairseq's optimizer
state (fp16_masters.py); fairseq_patches.py wires them in."""
