"""Half precision through the real commands: fairseq's --fp16 master weights of sharded experts
survive resharding. bf16 through every launch path (console script, python -m, cli_main, the
CPU launcher), with eval-lm equal to validation and fp32 checkpoints: test_launch_paths.py. The
same models in one process, every half-precision mode against fp32: unit/test_half_precision.py;
routers in fp32 under autocast: unit/test_numerics.py. (Exact resume in bf16: test_resume.py.)"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow


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
