"""Half precision on the CPU through the real commands: `fairseq-train --cpu --bf16` trains under
bf16 autocast with fp32 weights and optimizer state; checkpoints stay fp32 and load in either
mode; `fairseq-eval-lm --cpu --bf16` scores under autocast; fairseq's --fp16 master weights of
sharded experts survive resharding. The same models in one process, every half-precision mode
against fp32: unit/test_half_precision.py; routers in fp32 under autocast: unit/test_numerics.py.
(Exact resume in bf16: test_resume.py.)"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow

TRAIN = [
    "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", "--arch", "smlp_lm_tiny",
    "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128", "--tmoe-ffn-embed-dim", "64",
    "--criterion", "moe_cross_entropy", "--tokens-per-sample", "32", "--max-tokens", "512",
    "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "0.003", "--dropout", "0",
    "--max-update", "40", "--cpu", "--seed", "1", "--num-workers", "0", "--log-format", "json",
    "--log-interval", "10", "--no-epoch-checkpoints",
]


def run(cmd):
    out = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    return log


@pytest.fixture(scope="module")
def runs(data_bin, tmp_path_factory):
    """{precision: (training log, save dir)} of the same run in fp32 and in bf16."""
    root = tmp_path_factory.mktemp("bf16")
    out = {}
    for precision, extra in (("fp32", []), ("bf16", ["--bf16"])):
        save = root / precision
        out[precision] = (run(["fairseq-train", data_bin, *TRAIN, "--save-dir", save, *extra]), save)
    return out


def valid_loss(log):
    return [float(json.loads(line.split("| ", 3)[-1])["valid_loss"]) for line in log.splitlines() if "| valid |" in line][-1]


def eval_ppl(data_bin, checkpoint, *extra):
    log = run(["fairseq-eval-lm", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
               "--path", checkpoint, "--tokens-per-sample", "32", "--gen-subset", "valid", "--cpu", *extra])
    return float(re.search(r"Perplexity: ([0-9.]+)", log).group(1))


def test_bf16_loss_within_one_percent_of_fp32(runs):
    fp32, bf16 = valid_loss(runs["fp32"][0]), valid_loss(runs["bf16"][0])
    assert abs(bf16 - fp32) / fp32 < 0.01, (fp32, bf16)
    assert fp32 != bf16  # the bf16 run really ran in another precision


def test_bf16_checkpoint_is_fp32_and_loads_in_both_modes(runs, data_bin):
    log, save = runs["bf16"]
    state = load_checkpoint_file(save / "checkpoint_last.pt")
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    adam = state["last_optimizer_state"]["state"]
    assert {t.dtype for s in adam.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0} == {torch.float32}
    assert state["cfg"]["common"]["bf16"] is True  # the checkpoint says how it was trained
    fp32_ppl, bf16_ppl = eval_ppl(data_bin, save / "checkpoint_last.pt"), eval_ppl(data_bin, save / "checkpoint_last.pt", "--bf16")
    valid_ppl = 2 ** valid_loss(log)
    assert abs(bf16_ppl - valid_ppl) / valid_ppl < 2e-3  # eval-lm --bf16 == validation in bf16
    assert fp32_ppl != bf16_ppl and abs(fp32_ppl - bf16_ppl) / fp32_ppl < 0.01


def test_fp16_master_weights_of_sharded_experts_survive_resharding(data_bin, tmp_path):
    """2 workers, fairseq's --fp16 (on the CPU: SMLP_CPU_FP16=1) with one tMoE expert each: the
    fp32 master weights saved with the optimizer state are split and joined like the experts
    by reshard (2 -> 1 -> 2 gives back each rank's own)."""
    env = dict(os.environ, SMLP_CPU_FP16="1", OMP_NUM_THREADS="1")
    train = [sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", "2", "--", "fairseq-train", str(data_bin),
             "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", "--arch", "smlp_lm_tiny", "--decoder-layers", "2",
             "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "16", "--tmoe-experts", "2",
             "--smoe-experts", "2", "--criterion", "moe_cross_entropy", "--tokens-per-sample", "32", "--max-tokens", "128",
             "--optimizer", "adam", "--lr", "0.01", "--max-update", "3", "--fp16", "--fp16-no-flatten-grads",
             "--num-workers", "0", "--disable-validation", "--save-dir", str(tmp_path)]
    reshard = [sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard"]
    for cmd in (train, reshard + [str(tmp_path / "checkpoint_last.pt"), "--to-world-size", "1", "--out", str(tmp_path / "one.pt")],
                reshard + [str(tmp_path / "one.pt"), "--to-world-size", "2", "--out", str(tmp_path / "two.pt")]):
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]

    def load(name):
        return load_checkpoint_file(tmp_path / name)

    ranks, one = [load(f"checkpoint_last-rank-{r}.pt") for r in range(2)], load("one.pt")
    names = ranks[0]["expert_parallel"]["param_names"]
    expert = names.index("decoder.layers.1.feature_moe.experts.fc1_weight")
    masters = [r["last_optimizer_state"]["fp32_master"] for r in ranks]
    assert masters[0][expert].dtype == torch.float32 and not torch.equal(masters[0][expert], masters[1][expert])
    # the fp16 weights (saved upcast to fp32 by fairseq) are the master copy rounded
    assert torch.equal(masters[0][expert].half().float(), ranks[0]["model"][names[expert]])
    assert torch.equal(one["last_optimizer_state"]["fp32_master"][expert], torch.cat([m[expert] for m in masters]))
    for r in range(2):
        again = load(f"two-rank-{r}.pt")["last_optimizer_state"]["fp32_master"]
        assert all(torch.equal(a, b) for a, b in zip(again, masters[r]))
