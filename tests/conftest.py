"""Shared test fixtures: tiny sMLP models and paths to the shared data."""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SMLP_SHARED_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # fairseq checkpoints hold omegaconf objects


def tiny_dictionary(size: int = 40):
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"w{i}")
    return d


def build_tiny_smlp(seed: int = 0, vocab: int = 40, **overrides):
    """A few-thousand-parameter smlp_lm (dropout off) built without the CLI."""
    import fairseq_smlp  # noqa: F401
    from fairseq_smlp.models.smlp_lm import SmlpConfig, SmlpLanguageModel

    options = dict(
        decoder_embed_dim=16, decoder_ffn_embed_dim=32, decoder_layers=2, sparse_every=2,
        smoe_experts=4, tmoe_experts=4, tmoe_ffn_embed_dim=16, dropout=0.0,
        max_target_positions=24, tokens_per_sample=24, spatial_init_eps=1.0,
    )
    options.update(overrides)
    cfg = SmlpConfig(**options)
    dictionary = tiny_dictionary(vocab)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary, scores_partial_prediction=True)
    torch.manual_seed(seed)
    model = SmlpLanguageModel.build_model(cfg, task)
    # give the spatial matrices and output weights real size, so that a leak would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("fc2_weight"):
                p.normal_(0, 0.3)
    return model


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SMLP_SHARED_DATA)")
    return SHARED_DATA
