"""Build, then distribute: models are built with all their experts and without asking the
process group; `parallelize_experts(model, W, r)` then keeps rank r's experts, exactly the
experts [r * E/W, (r + 1) * E/W) of the unsharded model. (Two real workers:
integration/test_distributed.py, integration/test_base_layers_workers.py.)"""
import pytest
import torch

from fairseq_smlp.distributed import expert_parallel
from fairseq_smlp.distributed.expert_parallel import parallelize_experts
from fairseq_smlp.models.factory import build_model, offline_task
from fairseq_smlp.moe.base_experts import BaseExpertsLayer
from fairseq_smlp.moe.experts import ExpertFFN
from fairseq_smlp.moe.fairseq_base_layer import FairseqBaseLayer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ = 40, 16
TRANSFORMER = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
               "--decoder-layers", "2", "--dropout", "0"]
SMLP = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-layers", "2",
        "--tmoe-ffn-embed-dim", "16", "--smoe-experts", "4", "--tmoe-experts", "4", "--smoe-expert-parallel"]
MODELS = {
    "smlp": ("smlp_lm_tiny", SMLP),  # tMoE experts and sharded sMoE spatial experts
    "switch": ("switch_lm_tiny", TRANSFORMER + ["--moe-experts", "4"]),
    "gshard": ("gshard_lm_tiny", TRANSFORMER + ["--moe-experts", "4"]),
}


def build(arch, args, world_size=1):
    torch.manual_seed(0)
    model = build_model(arch, args, seq_len=SEQ, vocab=VOCAB, device="cpu", task=offline_task(VOCAB))[0]
    return parallelize_experts(model, world_size, 0) if world_size > 1 else model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_r_holds_experts_r_of_the_unsharded_model(name, world_size):
    arch, args = MODELS[name]
    whole = dict(build(arch, args).named_parameters())
    for rank in range(world_size):
        torch.manual_seed(0)
        model = build_model(arch, args, seq_len=SEQ, vocab=VOCAB, device="cpu", task=offline_task(VOCAB))[0]
        parallelize_experts(model, world_size, rank)
        sharded = 0
        for key, p in model.named_parameters():
            if getattr(p, "expert_sharded", False):
                local = whole[key].size(0) // world_size
                torch.testing.assert_close(p, whole[key][rank * local:(rank + 1) * local], rtol=0, atol=0, msg=key)
                assert p.expert  # skipped by legacy_ddp's all-reduce
                sharded += 1
            else:
                torch.testing.assert_close(p, whole[key], rtol=0, atol=0, msg=key)
        assert sharded > 0
    experts = [m for m in model.modules() if isinstance(m, ExpertFFN)]
    assert experts and all((m.world_size, m.num_local_experts) == (world_size, 4 // world_size) for m in experts)


def test_sharded_expert_gradients_are_divided_by_the_world_size():
    experts = ExpertFFN(4, 8, 16, pre_norm=False)
    parallelize_experts(experts, 2, 1)
    assert experts.fc1_weight.shape == (2, 8, 16) and experts.fc1_weight.expert_sharded
    (experts(torch.ones(2, 3, 8)).sum()).backward()
    reference = ExpertFFN(4, 8, 16, pre_norm=False)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.cat([getattr(experts, name).detach()] * 2))
    (reference(torch.ones(4, 3, 8))[2:].sum()).backward()
    torch.testing.assert_close(experts.fc2_weight.grad, reference.fc2_weight.grad[2:] / 2)


def test_replicated_spatial_experts_stay_whole():
    from fairseq_smlp.modules.spatial_gating import SpatialGatingUnit

    model = build("smlp_lm_tiny", [a for a in SMLP if a != "--smoe-expert-parallel"], world_size=2)
    gates = [m for m in model.modules() if isinstance(m, SpatialGatingUnit)]
    assert gates and all(g.world_size == 1 and g.mixing.weight.size(0) == g.num_experts for g in gates)
    assert all(e.num_local_experts == 2 for e in model.modules() if isinstance(e, ExpertFFN))  # the tMoE is sharded


def test_base_layer_rank_r_is_fairseqs_base_layer_holding_expert_r():
    """A Base layer of E = W experts becomes, on rank r, fairseq's BaseLayer with all W centroids
    and expert r (reshard --to-world-size 1 maps the rank files back: checkpoints/reshard.py)."""
    args = TRANSFORMER + ["--base-layers", "1", "--base-sublayers", "2", "--base-experts", "2"]
    whole = build("base_lm_tiny", args)
    one = whole.decoder.layers[1]
    assert isinstance(one, BaseExpertsLayer)
    for rank in range(2):
        model = build("base_lm_tiny", args, world_size=1)
        parallelize_experts(model, 2, rank)
        layer = model.decoder.layers[1]
        assert isinstance(layer, FairseqBaseLayer) and (layer.num_workers, layer.expert_id) == (2, rank)
        assert layer.name == one.router.name and layer in model.decoder.moe_modules
        assert torch.equal(layer.expert_centroids, one.router.centroids)
        for sub, stacked in zip(layer.expert_network, one.experts.sublayers):
            assert torch.equal(sub.ff1.weight, stacked.fc1_weight[rank].t())
            assert torch.equal(sub.ff2.bias, stacked.fc2_bias[rank, 0])
            assert torch.equal(sub.norm.weight, stacked.norm_weight[rank, 0])
        assert all(p.expert and p.expert_sharded for p in layer.expert_network.parameters())
        assert not getattr(layer.expert_centroids, "expert", False)  # shared: all-reduced
        keys = {k for k in model.state_dict() if ".layers.1." in k}
        assert "decoder.layers.1.expert_centroids" in keys and "decoder.layers.1.expert_network.0.ff1.weight" in keys


def test_fairseqs_base_layer_with_one_expert_per_worker_is_resized():
    """--base-experts 0: fairseq's BaseLayer built for one worker, given W centroids by parallelize_experts."""
    model = build("base_lm_tiny", TRANSFORMER + ["--base-layers", "1", "--base-experts", "0"], world_size=4)
    layer = model.decoder.layers[1]
    assert isinstance(layer, FairseqBaseLayer) and layer.expert_centroids.shape == (4, 16) and layer.num_workers == 4


def test_the_divisibility_error_names_the_flag():
    with pytest.raises(ValueError, match=r"--tmoe-experts / --moe-experts.*multiple of.*--distributed-world-size"):
        build("switch_lm_tiny", TRANSFORMER + ["--moe-experts", "3"], world_size=2)
    with pytest.raises(ValueError, match=r"--smoe-experts with --smoe-expert-parallel"):
        build("smlp_lm_tiny", SMLP + ["--smoe-experts", "2"], world_size=4)
    with pytest.raises(RuntimeError, match="already sharded"):
        parallelize_experts(build("switch_lm_tiny", TRANSFORMER, world_size=2), 2, 0)


def test_building_never_asks_the_process_group(monkeypatch):
    """Every model family is built without a world size or rank from torch.distributed or
    fairseq: the models' build_model asks once, through data_parallel_layout, to distribute
    the built model. Here that answer is 2 workers, rank 1, and nothing else may be asked."""
    from fairseq.distributed import utils as distributed_utils

    def asked(*args, **kwargs):
        raise AssertionError("the process group was asked while a model was built")

    for name in ("get_data_parallel_world_size", "get_data_parallel_rank", "get_world_size", "get_rank", "get_global_group"):
        monkeypatch.setattr(distributed_utils, name, asked)
    monkeypatch.setattr(torch.distributed, "get_world_size", asked)
    monkeypatch.setattr(torch.distributed, "get_rank", asked)
    layouts = []
    monkeypatch.setattr(expert_parallel, "data_parallel_layout", lambda: layouts.append(1) or (2, 1))
    base = TRANSFORMER + ["--base-layers", "1", "--base-experts", "2"]
    for arch, args in [*MODELS.values(), ("hash_lm_tiny", TRANSFORMER + ["--moe-experts", "4"]), ("base_lm_tiny", base)]:
        torch.manual_seed(0)
        model = build_model(arch, args, seq_len=SEQ, vocab=VOCAB, device="meta", task=offline_task(VOCAB))[0]
        sharded = [p for p in model.parameters() if getattr(p, "expert_sharded", False)]
        assert sharded, arch  # distributed once, as rank 1 of 2
    assert len(layouts) == 5
