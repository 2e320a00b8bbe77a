"""fairseq's BaseLayer with several workers: one expert per worker, so every
rank's checkpoint holds another expert. They are marked like sharded experts (rank files with
the expert_parallel metadata); `reshard --to-world-size 1` turns the W rank files into one
layer holding all W experts (moe/base_experts.py's layout) and W -> W is the identity.
(Half precision of the same layer: test_half_precision.py.)"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow

WORKERS = 2
ARGS = [
    "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", "--arch", "base_lm_tiny",
    "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
    "--decoder-layers", "2", "--base-sublayers", "2", "--base-experts", "2", "--tokens-per-sample", "32", "--criterion", "moe_cross_entropy",
    "--optimizer", "adam", "--lr", "0.01", "--max-tokens", "128", "--log-format", "json", "--log-interval", "2",
    "--no-epoch-checkpoints", "--num-workers", "0", "--seed", "2", "--required-batch-size-multiple", "1",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(cmd, ok=True):
    out = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    log = out.stdout + out.stderr
    assert (out.returncode == 0) == ok, log[-4000:]
    return log


def load(path):
    return load_checkpoint_file(path)


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("base_workers")
    run([sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", WORKERS, "--",
         "fairseq-train", data_bin, *ARGS, "--save-dir", save, "--max-update", "8", "--disable-validation"])
    merged = save / "merged.pt"
    log = run([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", save / "checkpoint_last.pt", "--to-world-size", "1", "--out", merged])
    return save, merged, log


def test_every_rank_saves_its_own_expert_with_the_layout(trained):
    save, _, _ = trained
    ranks = [load(save / f"checkpoint_last-rank-{r}.pt") for r in range(WORKERS)]
    key = "decoder.layers.1.expert_network.0.ff1.weight"
    assert not torch.equal(ranks[0]["model"][key], ranks[1]["model"][key])  # two experts, trained apart
    centroids = "decoder.layers.1.expert_centroids"
    assert torch.equal(ranks[0]["model"][centroids], ranks[1]["model"][centroids])  # shared, all-reduced
    for r, state in enumerate(ranks):
        meta = state["expert_parallel"]
        assert (meta["world_size"], meta["rank"]) == (WORKERS, r)
        assert set(meta["expert_params"]) == {k for k in state["model"] if ".expert_network." in k}


def test_reshard_to_one_process_keeps_every_expert(trained):
    """Before: reshard found no expert tensor and kept rank 0's expert only (centroids (2, H),
    one expert): W - 1 experts lost, and eval-lm failed on the centroid shape."""
    save, merged, log = trained
    ranks = [load(save / f"checkpoint_last-rank-{r}.pt")["model"] for r in range(WORKERS)]
    one = load(merged)
    assert "BaseLayer of 2 workers -> one layer with all 2 experts" in log
    assert one["cfg"]["model"]["base_experts"] == WORKERS and one["cfg"]["distributed_training"]["distributed_world_size"] == 1
    model = one["model"]
    assert not any(".expert_network." in k or k.endswith("expert_centroids") for k in model)
    assert torch.equal(model["decoder.layers.1.router.centroids"], ranks[0]["decoder.layers.1.expert_centroids"])
    for s in range(2):
        new, old = f"decoder.layers.1.experts.sublayers.{s}.", f"decoder.layers.1.expert_network.{s}."
        for r in range(WORKERS):
            assert torch.equal(model[new + "fc1_weight"][r], ranks[r][old + "ff1.weight"].t())
            assert torch.equal(model[new + "fc2_weight"][r], ranks[r][old + "ff2.weight"].t())
            assert torch.equal(model[new + "fc1_bias"][r, 0], ranks[r][old + "ff1.bias"])
            assert torch.equal(model[new + "norm_weight"][r, 0], ranks[r][old + "norm.weight"])
    shared = "decoder.layers.0.fc1.weight"
    assert torch.equal(model[shared], ranks[0][shared])


def test_the_merged_layer_computes_what_each_worker_computed(trained, data_bin):
    """The merged file, loaded as fairseq-eval-lm loads it (one process: BaseExpertsLayer with
    both experts), sends each token to its greedy expert and gives what fairseq's BaseSublayers
    of that expert's rank give, mixed by fairseq's sigmoid(x . c_e)."""
    from types import SimpleNamespace

    from fairseq import checkpoint_utils
    from fairseq.modules.base_layer import BaseSublayer

    from fairseq_smlp.moe.base_experts import BaseExpertsLayer

    save, merged, _ = trained
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(merged)], arg_overrides={"data": str(data_bin)})
    layer = models[0].decoder.layers[1]
    assert isinstance(layer, BaseExpertsLayer) and layer.router.centroids.size(0) == WORKERS
    ranks = [load(save / f"checkpoint_last-rank-{r}.pt")["model"] for r in range(WORKERS)]
    x = torch.randn(40, 1, 16, generator=torch.Generator().manual_seed(0))
    layer.eval()
    with torch.no_grad():
        out = layer(x)[0].squeeze(1)
        scores = x.squeeze(1) @ ranks[0]["decoder.layers.1.expert_centroids"].t()
    expert = scores.argmax(1)
    assert set(expert.tolist()) == set(range(WORKERS))  # both experts get tokens
    args = SimpleNamespace(decoder_embed_dim=16, decoder_ffn_embed_dim=32, activation_fn="relu")
    for r in range(WORKERS):
        sublayers = torch.nn.Sequential(*(BaseSublayer(args) for _ in range(2)))
        sublayers.load_state_dict({k.split("expert_network.")[1]: v for k, v in ranks[r].items() if ".expert_network." in k})
        mine = expert == r
        with torch.no_grad():
            xs = x.squeeze(1)[mine]
            alpha = torch.sigmoid(scores[mine, r]).unsqueeze(1)
            torch.testing.assert_close(out[mine], alpha * sublayers(xs) + (1 - alpha) * xs, rtol=1e-5, atol=1e-5)


def test_reshard_to_the_same_workers_is_the_identity_and_others_are_refused(trained, tmp_path):
    save, _, _ = trained
    run([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", save / "checkpoint_last.pt", "--to-world-size", WORKERS, "--out", tmp_path / "again.pt"])
    for r in range(WORKERS):
        a, b = load(save / f"checkpoint_last-rank-{r}.pt")["model"], load(tmp_path / f"again-rank-{r}.pt")["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = run([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", save / "checkpoint_last.pt", "--to-world-size", "4", "--out", tmp_path / "four.pt"], ok=False)
    assert "fairseq's BaseLayer holds one expert per worker: 2 rank files can become one process" in log
    assert not (tmp_path / "four-rank-0.pt").exists()


def test_a_rank_file_in_one_process_names_the_fix(trained, data_bin):
    save, _, _ = trained
    log = run(["fairseq-eval-lm", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
               "--path", save / "checkpoint_last-rank-0.pt", "--tokens-per-sample", "32", "--cpu"], ok=False)
    assert "2 workers" in log and "fairseq_smlp.checkpoints reshard CKPT --to-world-size 1" in log


def _uneven_worker(rank, port, out):
    import torch.distributed as dist
    from types import SimpleNamespace

    import fairseq_smlp  # noqa: F401
    from fairseq_smlp.distributed.expert_parallel import parallelize_experts
    from fairseq_smlp.moe.fairseq_base_layer import FairseqBaseLayer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    layer = FairseqBaseLayer(SimpleNamespace(decoder_embed_dim=8, decoder_ffn_embed_dim=16, base_sublayers=1,
                                             base_shuffle=1, activation_fn="relu"))
    parallelize_experts(layer, 2, rank)
    try:
        layer(torch.randn(6 if rank == 0 else 4, 1, 8, requires_grad=True))
        message = "no error"
    except ValueError as e:
        message = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)
    dist.barrier()
    dist.destroy_process_group()


def test_unequal_token_counts_stop_every_worker_with_the_counts(tmp_path):
    """fairseq's BaseLayer exchanges equal blocks in training: 6 and 4 tokens made gloo abort
    a worker (SIGABRT) and the other wait. Now both stop with the counts named."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_uneven_worker, args=(port, str(tmp_path / "msg")), nprocs=2, start_method="spawn")
    for rank in range(2):
        assert "the same number of tokens on every worker" in (tmp_path / f"msg.{rank}").read_text()
        assert "[6, 4]" in (tmp_path / f"msg.{rank}").read_text()
