"""Dense gMLP baselines (Liu et al. 2021): `smlp_lm` with no sparse block.

FLOP-matched to smlp_lm_* of the same size by adding blocks (width unchanged): a sparse
sMLP block adds a tMoE expert FFN to a gMLP block, so the dense model needs more blocks
for the same compute (tiny: 5 instead of 4, base: 18 instead of 12, large: 36 instead
of 24; see docs/baselines.md).
"""
from fairseq.models import register_model_architecture

from .smlp_lm import smlp_lm_base, smlp_lm_large, smlp_lm_tiny


def _dense(args, layers: int) -> None:
    if getattr(args, "sparse_every", None) is None:
        args.sparse_every = 0
    if getattr(args, "decoder_layers", None) is None:
        args.decoder_layers = layers


@register_model_architecture("smlp_lm", "gmlp_lm_tiny")
def gmlp_lm_tiny(args):
    """5 dense gMLP blocks of width 128 (FFN 512)."""
    _dense(args, 5)
    smlp_lm_tiny(args)


@register_model_architecture("smlp_lm", "gmlp_lm_base")
def gmlp_lm_base(args):
    """18 dense gMLP blocks of width 768 (FFN 3072)."""
    _dense(args, 18)
    smlp_lm_base(args)


@register_model_architecture("smlp_lm", "gmlp_lm_large")
def gmlp_lm_large(args):
    """36 dense gMLP blocks of width 1024 (FFN 4096)."""
    _dense(args, 36)
    smlp_lm_large(args)
