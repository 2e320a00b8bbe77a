"""The same short training through every way users launch fairseq-train, in fp32 and bf16:
the console script, `python -m fairseq_cli.train`, `fairseq_cli.train.cli_main()` called from
the user's own Python, and the CPU launcher's workers; and through `python -m` with the router
README recommends (`--tmoe-router top1 --tmoe-train-capacity-factor 0`). For each: fairseq-eval-lm
on the saved checkpoint equals training's last validation, and bf16 is within 2% of fp32.

A bf16 run whose autocast outlived its optimizer steps (torch's cache of bf16 weight copies
then keeps the first step's weights) fails both: its validation scores stale weights and its
checkpoint holds others (`python -m fairseq_cli.train --bf16` did exactly that)."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow

TRAIN = [
    "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", "--arch", "smlp_lm_tiny",
    "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128", "--tmoe-ffn-embed-dim", "64",
    "--criterion", "moe_cross_entropy", "--tokens-per-sample", "32", "--max-tokens", "512",
    "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "0.003", "--dropout", "0",
    "--max-update", "40", "--cpu", "--seed", "1", "--num-workers", "0", "--log-format", "json",
    "--log-interval", "10", "--no-epoch-checkpoints",
]
IN_PROCESS = "import sys; from fairseq_cli.train import cli_main; sys.argv[0] = 'train.py'; cli_main()"
LAUNCHERS = {
    "console": ["fairseq-train"],
    "module": [sys.executable, "-m", "fairseq_cli.train"],
    "in_process": [sys.executable, "-c", IN_PROCESS],
    "launcher": [sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", "2", "--", "fairseq-train"],
    "module_top1_dropless": [sys.executable, "-m", "fairseq_cli.train"],
}
ROUTER_FLAGS = {"module_top1_dropless": ["--tmoe-router", "top1", "--tmoe-train-capacity-factor", "0"]}
PRECISIONS = {"fp32": [], "bf16": ["--bf16"]}


def run(cmd):
    out = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    return log


def json_records(log: str, tag: str) -> list:
    return [json.loads(line.split("| ", 3)[-1]) for line in log.splitlines() if f"| {tag} |" in line]


def finish(process) -> str:
    """The output of a process of conftest.start_quietly, which must have succeeded."""
    from conftest import finish as wait_for

    out = wait_for(process, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def runs(data_bin, tmp_path_factory):
    """{(launcher, precision): (training log, save dir)}: every case trained at once, one thread
    per process (independent runs: on two cores about half the wall-clock of one after another)."""
    from conftest import start_quietly

    root = tmp_path_factory.mktemp("launch_paths")
    started = {}
    for launcher, precision in CASES:
        save = root / f"{launcher}_{precision}"
        command = [*LAUNCHERS[launcher], data_bin, *TRAIN, *ROUTER_FLAGS.get(launcher, []), "--save-dir", save, *PRECISIONS[precision]]
        started[launcher, precision] = start_quietly(command, cwd=REPO), save
    return {case: (finish(process), save) for case, (process, save) in started.items()}


def last_valid_loss(log: str) -> float:
    """Training's last validation NLL (bits per token), what its ppl is computed from (valid_loss
    adds the routers' weighted load-balancing losses, which fairseq-eval-lm does not score)."""
    return float(json_records(log, "valid")[-1]["valid_nll_loss"])


def eval_lm_command(data_bin, checkpoint, *flags) -> list:
    return ["fairseq-eval-lm", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
            "--path", checkpoint, "--tokens-per-sample", "32", "--gen-subset", "valid", "--cpu", *flags]


def eval_lm_loss(log: str) -> float:
    """fairseq-eval-lm's loss (bits per token) from its output."""
    return float(re.search(r"Loss \(base 2\): ([0-9.]+)", log).group(1))


@pytest.fixture(scope="module")
def scored(runs, data_bin):
    """{(launcher, precision): eval-lm's loss of the run's checkpoint in the run's precision}, and
    ("console", "bf16", "in fp32"): the bf16-trained checkpoint scored in fp32; all at once."""
    from conftest import start_quietly

    commands = {case: eval_lm_command(data_bin, one_file(save), *PRECISIONS[case[1]]) for case, (log, save) in runs.items()}
    commands["console", "bf16", "in fp32"] = eval_lm_command(data_bin, runs["console", "bf16"][1] / "checkpoint_last.pt")
    started = {key: start_quietly(command, cwd=REPO) for key, command in commands.items()}
    return {key: eval_lm_loss(finish(process)) for key, process in started.items()}


CASES = [(launcher, precision) for launcher in LAUNCHERS for precision in PRECISIONS]


def one_file(save):
    """The run's last checkpoint as one file (the launcher's workers each save their own experts)."""
    if (save / "checkpoint_last.pt").exists():
        return save / "checkpoint_last.pt"
    run([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", save / "checkpoint_last.pt",
         "--to-world-size", "1", "--out", save / "merged.pt"])
    return save / "merged.pt"


@pytest.mark.parametrize("launcher, precision", CASES)
def test_eval_lm_scores_the_checkpoint_as_training_validated_it(runs, scored, launcher, precision):
    valid = last_valid_loss(runs[launcher, precision][0])
    score = scored[launcher, precision]
    assert math.isclose(2 ** score, 2 ** valid, rel_tol=5e-3), (launcher, precision, valid, score)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_bf16_trains_as_fp32_does(runs, launcher):
    fp32, bf16 = (last_valid_loss(runs[launcher, p][0]) for p in PRECISIONS)
    assert abs(bf16 - fp32) / fp32 < 0.02, (launcher, fp32, bf16)
    assert bf16 != fp32  # the bf16 run really ran in another precision
    first, last = (float(r["loss"]) for r in (json_records(runs[launcher, "bf16"][0], "train_inner")[i] for i in (0, -1)))
    assert last < first - 1.0  # and it learned


def test_one_process_launchers_train_the_same_model(runs):
    """Console script, `python -m` and cli_main() are one training: identical losses."""
    for precision in PRECISIONS:
        losses = {launcher: [r["loss"] for r in json_records(runs[launcher, precision][0], "train_inner")]
                  for launcher in ("console", "module", "in_process")}
        assert losses["console"] == losses["module"] == losses["in_process"], (precision, losses)


def test_bf16_checkpoint_is_fp32_and_says_how_it_was_trained(runs, scored):
    log, save = runs["console", "bf16"]
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    adam = state["last_optimizer_state"]["state"]
    assert {t.dtype for s in adam.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0} == {torch.float32}
    assert state["cfg"]["common"]["bf16"] is True
    fp32_score = scored["console", "bf16", "in fp32"]  # a bf16-trained model scored in fp32
    assert fp32_score != last_valid_loss(log) and abs(fp32_score - last_valid_loss(log)) / fp32_score < 0.01
