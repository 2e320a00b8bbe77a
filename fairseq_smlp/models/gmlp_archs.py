"""Dense gMLP baselines (Liu et al. 2021): `smlp_lm` with no sparse block.

FLOP-matched to smlp_lm_* of the same size by adding blocks (width unchanged): a sparse
sMLP block adds a tMoE expert FFN to a gMLP block, so the dense model needs more blocks
for the same compute (tiny: 5 instead of 4, base: 18 instead of 12, large: 36 instead
of 24; see docs/baselines.md).
"""
from .archs import register_archs
from .smlp_lm import SIZES

BLOCKS = {"tiny": 5, "base": 18, "large": 36}


def _describe(d: dict) -> str:
    width, ffn = d["decoder_embed_dim"], d["decoder_ffn_embed_dim"]
    return f"{d['decoder_layers']} dense gMLP blocks of width {width} (FFN {ffn})"


register_archs(
    "smlp_lm",
    "gmlp_lm",
    {size: dict(SIZES[size], sparse_every=0, decoder_layers=layers) for size, layers in BLOCKS.items()},
    describe=_describe,
)
