"""bf16 on the CPU through the real commands: `fairseq-train --cpu --bf16` trains under bf16
autocast with fp32 weights and optimizer state; checkpoints stay fp32 and load in either mode;
`fairseq-eval-lm --cpu --bf16` scores under autocast. (Exact resume in bf16: test_resume.py;
routers in fp32 under autocast: test_numerics.py.)"""
import json
import re
import subprocess

import pytest
import torch

from conftest import REPO
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

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
