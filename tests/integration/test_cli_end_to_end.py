"""End to end through the real commands: fairseq-preprocess, fairseq-train, fairseq-eval-lm,
checkpoint reload and generation, on a slice of Penn Treebank."""
import json
import math
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SMALL = [
    "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--tmoe-ffn-embed-dim", "32",
    "--smoe-experts", "4", "--tmoe-experts", "2", "--tokens-per-sample", "32",
]


def run(cmd, **kw):
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def train_command(data_bin, save_dir, extra=(), updates=40):
    return [
        "fairseq-train", str(data_bin), "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
        "--arch", "smlp_lm_tiny", *SMALL, "--criterion", "moe_cross_entropy", "--dropout", "0.0",
        "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "512", "--max-update", str(updates),
        "--cpu", "--save-dir", str(save_dir), "--log-format", "json", "--log-interval", "5",
        "--no-epoch-checkpoints", "--seed", "3", "--num-workers", "0",
        "--required-batch-size-multiple", "1", *extra,  # fairseq drops a remainder batch otherwise
    ]


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    """{routing: (training log, save dir)}: both sMoE routings trained side by side (one thread each)."""
    from conftest import finish, start_quietly

    root = tmp_path_factory.mktemp("cli_end_to_end")
    started = {routing: start_quietly(train_command(data_bin, root / routing, ["--smoe-routing", routing, "--tensorboard-logdir", root / routing / "tb"]),
                                      cwd=REPO)
               for routing in ("deterministic", "partial")}
    runs = {}
    for routing, process in started.items():
        out = finish(process, timeout=600)
        assert out.returncode == 0, f"{' '.join(map(str, process.args))} failed:\n{out.stdout[-3000:]}"
        runs[routing] = out.stdout, root / routing
    return runs


def json_records(log, tag):
    return [json.loads(line.split("| ", 3)[-1]) for line in log.splitlines() if tag in line]


def eval_lm(data_bin, checkpoint, subset="valid"):
    log = run([
        "fairseq-eval-lm", str(data_bin), "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
        "--path", str(checkpoint), "--tokens-per-sample", "32", "--gen-subset", subset, "--cpu",
    ])
    ppl = float(re.search(r"Perplexity: ([0-9.]+)", log).group(1))
    return ppl, log


@pytest.mark.parametrize("routing", ["deterministic", "partial"])
def test_train_eval_and_reload(data_bin, trained, routing):
    log, save_dir = trained[routing]
    inner, valid = json_records(log, "train_inner |"), json_records(log, "| valid |")
    losses = [float(r["loss"]) for r in inner]
    assert losses[-1] < losses[0] - 1.0, f"loss did not decrease: {losses}"
    # routing health: a summary over layers, and every layer's figures in the JSON log ...
    layers = ["L1_feature_moe", "L3_feature_moe"] + (["L1_spatial_moe", "L3_spatial_moe"] if routing == "partial" else [])
    assert {f"moe/{layer}_load_max" for layer in layers} | {"moe_load_max", "moe_unused"} <= set(inner[-1])
    # the mean over batches of the worst layer is at least the worst layer's mean
    assert float(inner[-1]["moe_load_max"]) >= max(float(inner[-1][f"moe/{layer}_load_max"]) for layer in layers) - 1e-3
    # ... and in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir / "tb" / "train_inner"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {f"moe/{layer}_load_max" for layer in layers} | {"moe_load_max", "loss"} <= set(scalars)
    load = [e.value for e in events.Scalars("moe/L1_feature_moe_load_max")]
    assert len(load) == len(inner) and all(1.0 <= v <= 2.0 for v in load)  # 2 experts: 1 = balanced, 2 = all on one

    # fairseq-eval-lm reloads the checkpoint and scores the same positions as validation did
    valid_ppl = float(valid[-1]["valid_ppl"])
    ppl, eval_log = eval_lm(data_bin, save_dir / "checkpoint_last.pt")
    assert math.isclose(ppl, valid_ppl, rel_tol=1e-4), (ppl, valid_ppl)
    if routing == "partial":
        assert "perplexity over positions >= 7" in eval_log  # ceil(0.2 * 32)


def test_generation_matches_full_forward(data_bin, trained):
    """Sampling through incremental_state scores every token exactly as a full forward does
    (the deterministic run's checkpoint)."""
    save_dir = trained["deterministic"][1]
    code = f"""
import torch, fairseq_smlp
from fairseq_smlp.models.smlp_lm import SmlpLanguageModel
hub = SmlpLanguageModel.from_pretrained({str(save_dir)!r}, "checkpoint_last.pt", {str(data_bin)!r})
hub.eval()
torch.manual_seed(0)
prompt = hub.encode("the company said")
out = hub.generate([prompt], beam=1, sampling=True, sampling_topk=20, max_len_b=12, min_len=12)[0][0]
tokens = out["tokens"]
full = torch.cat([prompt[-1:].new_tensor([hub.task.source_dictionary.eos()]), tokens[:-1]])[None]
lprobs = hub.models[0].get_normalized_probs(hub.models[0](full), log_probs=True)[0]
recomputed = lprobs.gather(1, tokens[:, None]).squeeze(1)
print("MAXDIFF", (recomputed - out["positional_scores"]).abs().max().item(), "LEN", len(tokens))
"""
    stdout = run([sys.executable, "-c", code])
    diff = float(re.search(r"MAXDIFF ([0-9.e-]+)", stdout).group(1))
    length = int(re.search(r"LEN (\d+)", stdout).group(1))
    assert length >= 12
    assert diff < 1e-4
