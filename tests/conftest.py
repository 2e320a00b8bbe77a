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


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    """A small fairseq data-bin: the first lines of PTB, binarized by fairseq-preprocess."""
    import subprocess

    if not (SHARED_DATA / "ptb").exists():
        pytest.skip("shared PTB data not available")
    root = tmp_path_factory.mktemp("ptb")
    for split, lines in [("train", 1500), ("valid", 200), ("test", 200)]:
        text = (SHARED_DATA / "ptb" / f"{split}.txt").read_text().splitlines(keepends=True)[:lines]
        (root / f"{split}.txt").write_text("".join(text))
    subprocess.run(
        ["fairseq-preprocess", "--only-source", "--trainpref", str(root / "train.txt"),
         "--validpref", str(root / "valid.txt"), "--testpref", str(root / "test.txt"),
         "--destdir", str(root / "bin"), "--workers", "1"],
        check=True, capture_output=True, timeout=300,
    )
    return root / "bin"
