"""Precision on the CPU (fairseq_smlp/precision.py and its two patches): what --bf16 and --fp16
mean there, and autocast contexts that never outlive a weight update. End to end through
every launch path: integration/test_launch_paths.py."""
import copy
from types import SimpleNamespace

import pytest
import torch

import fairseq_smlp  # noqa: F401  (installs the patches)
from conftest import build_tiny_smlp, fairseq_trainer
from fairseq_smlp import precision


def cpu_config(**flags):
    common = dict(cpu=True, fp16=False, memory_efficient_fp16=False, bf16=False, memory_efficient_bf16=False, tpu=False)
    return SimpleNamespace(common=SimpleNamespace(**{**common, **flags}), distributed_training=SimpleNamespace(tpu=False))


@pytest.mark.parametrize("flag, message", [
    ("fp16", "--fp16 needs a CUDA GPU"),
    ("memory_efficient_fp16", "--memory-efficient-fp16 needs a CUDA GPU"),
    ("memory_efficient_bf16", "--memory-efficient-bf16 .* is not supported on the CPU: use --bf16"),
])
def test_half_precision_flags_fairseq_cannot_run_on_cpu_are_named(flag, message):
    with pytest.raises(ValueError, match=message):
        precision.check_precision(cpu_config(**{flag: True}))


def test_bf16_on_cpu_is_autocast_with_an_fp32_trainer():
    """fairseq reads --bf16 as a TPU run with a bf16 model, in both the common and the
    distributed config: here it is bf16 autocast, and fairseq's Trainer sees an fp32 CPU run."""
    cfg = cpu_config(bf16=True, tpu=True)
    cfg.distributed_training.tpu = True
    precision.check_precision(cfg)
    assert precision.cpu_autocast_dtype(cfg) == torch.bfloat16
    trainer_cfg = precision.fp32_trainer_config(cfg)
    assert not trainer_cfg.common.bf16 and not trainer_cfg.common.tpu and not trainer_cfg.distributed_training.tpu
    assert cfg.common.bf16 and cfg.common.tpu  # the caller's config is left as it was
    assert precision.cpu_autocast_dtype(cpu_config()) is None


def test_autocast_each_call_sees_every_weight_update():
    """One context per call: an in-place update between calls reaches the next call. (Inside
    one long context torch would keep serving the first call's bf16 copy of the weight.)"""
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    forward = precision.autocast_each_call(layer, torch.bfloat16)
    assert forward(x).dtype == torch.bfloat16
    with torch.no_grad():
        layer.weight.mul_(-1)
    assert torch.allclose(forward(x).float(), layer(x), atol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the failure this rule prevents
        before = layer(x)
        with torch.no_grad():
            layer.weight.mul_(-1)
        assert torch.equal(layer(x), before)  # stale: the cached bf16 copy of the old weight


TRAIN = ["--task", "smlp_language_modeling", "--arch", "smlp_lm_tiny", "--decoder-embed-dim", "32",
         "--decoder-ffn-embed-dim", "64", "--tmoe-ffn-embed-dim", "32", "--criterion", "moe_cross_entropy",
         "--tokens-per-sample", "32", "--max-tokens", "256", "--optimizer", "adam", "--lr", "0.01",
         "--dropout", "0", "--cpu", "--seed", "1", "--num-workers", "0", "--bf16"]


def test_training_under_a_callers_long_autocast_uses_the_updated_weights(data_bin):
    """A caller that holds autocast around its whole loop (as `python -m fairseq_cli.train`
    once did) must not train or validate on stale weights: the Trainer forgets torch's bf16
    copies of the weights after every update, so the model then computes what a fresh copy of
    it computes."""
    _, _, trainer = fairseq_trainer(data_bin, *TRAIN)
    batches = trainer.get_train_iterator(epoch=1).next_epoch_itr(shuffle=False)
    tokens = next(batches)["net_input"]["src_tokens"]
    model = trainer.model
    with torch.autocast("cpu", dtype=torch.bfloat16):  # held across the updates
        for _ in range(3):
            trainer.train_step([next(batches)])
        with torch.no_grad():
            held = model.eval()(tokens)[0].float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = copy.deepcopy(model)(tokens)[0].float()  # new tensors: nothing cached for them
    assert torch.allclose(held, fresh, atol=1e-3), (held - fresh).abs().max()


def test_evaluation_commands_autocast_each_forward():
    """fairseq-eval-lm / -generate ready a model with prepare_for_inference_(cfg): with --bf16 on
    the CPU its decoder then runs each forward under its own bf16 context."""
    model = build_tiny_smlp().eval()
    tokens = torch.randint(4, 40, (2, 12))
    fp32 = model(tokens)[0]
    model.prepare_for_inference_(SimpleNamespace(**vars(cpu_config(bf16=True)), generation=None))
    bf16 = model(tokens)[0]
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.float(), fp32, atol=0.1, rtol=0.05)
    assert not torch.is_autocast_enabled("cpu")  # nothing outlives the forward
    plain = build_tiny_smlp().eval()
    plain.prepare_for_inference_(SimpleNamespace(**vars(cpu_config()), generation=None))
    assert plain(tokens)[0].dtype == torch.float32
