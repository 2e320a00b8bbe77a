"""The baselines through the real commands: every family (Switch, GShard, HASH, Base Layers,
dense Transformer, dense gMLP) trains 4 updates with fairseq-train and is scored by
fairseq-eval-lm, with its routing statistics in the training log. The routers, causality and
incremental decoding in one process: unit/test_baselines.py; how each method starts its
experts: unit/test_fair_baselines.py."""
import json
import math
import os
import random
import re
import subprocess

import pytest

from conftest import REPO
# family -> arch, as unit/test_baselines.py's FAMILIES (which adds each family's no-dropout flags)
FAMILIES = {
    "switch": "switch_lm_tiny",
    "gshard": "gshard_lm_tiny",
    "hash": "hash_lm_tiny",
    "base": "base_lm_tiny",
    "transformer": "transformer_lm_tiny",
    "gmlp": "gmlp_lm_tiny",
}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

def start(cmd):
    # one thread per process: the runs go side by side, and tiny ops do not wait on busy cores
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{' '.join(process.args)} failed:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    """A small synthetic corpus (a fixed random bigram chain over 30 words), preprocessed."""
    root = tmp_path_factory.mktemp("baselines_data")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    successors = {w: rng.sample(words, 4) for w in words}
    for split, lines in [("train", 300), ("valid", 40)]:
        text = []
        for _ in range(lines):
            w = rng.choice(words)
            sentence = [w]
            for _ in range(rng.randint(5, 15)):
                w = rng.choice(successors[w])
                sentence.append(w)
            text.append(" ".join(sentence))
        (root / f"{split}.txt").write_text("\n".join(text) + "\n")
    finish(start([
        "fairseq-preprocess", "--only-source", "--trainpref", root / "train.txt",
        "--validpref", root / "valid.txt", "--destdir", root / "bin", "--workers", "1",
    ]))
    return root / "bin"


@pytest.fixture(scope="module")
def cli_runs(data_bin, tmp_path_factory):
    """Every family: fairseq-train 4 updates, then fairseq-eval-lm on the checkpoint (all
    families side by side). family -> (training log, eval-lm output)."""
    save = {family: tmp_path_factory.mktemp(family) for family in FAMILIES}
    training = {
        family: start([
            "fairseq-train", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
            "--arch", arch, "--criterion", "moe_cross_entropy", "--tokens-per-sample", "32", "--max-tokens", "256",
            "--optimizer", "adam", "--lr", "0.003", "--max-update", "4", "--cpu", "--save-dir", save[family],
            "--log-format", "json", "--log-interval", "1", "--no-epoch-checkpoints", "--disable-validation",
            "--num-workers", "0", "--seed", "1",
        ])
        for family, arch in FAMILIES.items()
    }
    logs = {family: finish(p) for family, p in training.items()}
    evaluation = {
        family: start([
            "fairseq-eval-lm", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
            "--path", save[family] / "checkpoint_last.pt", "--tokens-per-sample", "32", "--gen-subset", "valid", "--cpu",
        ])
        for family in FAMILIES
    }
    return {family: (logs[family], finish(p)) for family, p in evaluation.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_eval_lm(cli_runs, family):
    log, eval_out = cli_runs[family]
    inner = [json.loads(line.split("| ", 3)[-1]) for line in log.splitlines() if "train_inner |" in line]
    assert len(inner) == 4 and all(math.isfinite(float(r["loss"])) for r in inner)
    stat_keys = [k for k in inner[-1] if k.startswith(("moe_", "moe/"))]
    if family in ("switch", "gshard", "hash"):
        assert {"moe/L1_ffn_moe_load_max", "moe/L1_ffn_moe_load_min", "moe/L1_ffn_moe_unused", "moe/L1_ffn_moe_dropped"} <= set(stat_keys)
        assert ("moe/L3_ffn_moe_aux" in stat_keys) == (family != "hash")
    elif family == "base":
        assert "moe/L1_base_layer_load_max" in stat_keys
    else:
        assert not stat_keys
    ppl = float(re.search(r"Perplexity: ([0-9.]+)", eval_out).group(1))
    assert 1 < ppl < 1000
