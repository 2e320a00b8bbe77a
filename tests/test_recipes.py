"""Every recipe passes DRY_RUN=1 (fairseq parses it, experts fit the GPUs, the model builds)
and refuses clearly, writing nothing, when its data path is missing."""
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

TRAIN_RECIPES = sorted(p.name for p in (REPO / "recipes").glob("train_gpu*.sh"))


def run_recipe(name, tmp_path, **env):
    full_env = {**os.environ, "SAVE_DIR": str(tmp_path / "save"), **env}
    return subprocess.run(
        ["bash", str(REPO / "recipes" / name)], cwd=tmp_path, env=full_env,
        capture_output=True, text=True, timeout=300,
    )


def test_recipes_exist_for_every_run_of_the_paper():
    expected = {"train_gpu64.sh"} | {
        f"train_gpu32_{m}.sh" for m in ["smlp", "smlp_partial", "gshard", "switch", "base", "hash", "transformer", "gmlp"]
    }
    expected |= {f"train_gpu64_{m}.sh" for m in ["gshard", "switch", "base", "hash"]}  # the scaled comparison
    assert expected <= set(TRAIN_RECIPES)


@pytest.mark.parametrize("recipe", TRAIN_RECIPES)
def test_dry_run(recipe, tmp_path):
    out = run_recipe(recipe, tmp_path, DRY_RUN="1")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "+ python -m fairseq_smlp.dry_run" in log  # the full command is printed
    assert "dry run OK" in log
    assert not (tmp_path / "save").exists()


def test_gpu64_recipe_is_the_9b_model_with_one_expert_per_gpu(tmp_path):
    log = run_recipe("train_gpu64.sh", tmp_path, DRY_RUN="1").stdout
    assert "experts {'--tmoe-experts': 64}" in log
    params = float(log.split("full size: ")[1].split("M parameters")[0].replace(",", ""))
    assert 9300 < params < 9500  # about 9.4B


def test_dry_run_estimates_the_run_from_its_flops(tmp_path):
    """3 x forward FLOPs/token x tokens over GPUs x peak x utilisation, with the recipe's sizes."""
    log = run_recipe("train_gpu64.sh", tmp_path, DRY_RUN="1", GPU_PEAK_TFLOPS="100", UTILISATION="0.5").stdout
    estimate = log.split("estimate: ")[1]
    tokens = 64 * 8192 * 2 * 100000  # GPUS x MAX_TOKENS x UPDATE_FREQ x MAX_UPDATE
    assert f"x {tokens / 1e9:,.1f}B tokens" in estimate
    forward = float(estimate.split("M forward")[0].replace(",", "")) * 1e6
    days = 3 * forward * tokens / (64 * 100e12 * 0.5) / 86400
    assert f"{days:,.1f} days on 64 GPUs at 100 TFLOP/s x 0.5 utilisation" in estimate


def test_base_layers_count_one_expert_per_gpu(tmp_path):
    log = run_recipe("train_gpu64_base.sh", tmp_path, DRY_RUN="1").stdout
    params = float(log.split("full size: ")[1].split("M parameters")[0].replace(",", ""))
    assert 9500 < params < 10500  # the paper's Base Layers 10B: 64 workers, one expert each


def test_expert_count_that_does_not_fit_the_gpus_is_refused(tmp_path):
    out = run_recipe("train_gpu64.sh", tmp_path, DRY_RUN="1", GPUS="48")
    assert out.returncode != 0
    assert "--tmoe-experts 64 is not a multiple of the world size 48" in out.stdout + out.stderr


def test_missing_data_is_refused_and_nothing_written(tmp_path):
    out = run_recipe("train_gpu64.sh", tmp_path, DATA=str(tmp_path / "nope"))
    assert out.returncode == 2
    assert f"DATA='{tmp_path / 'nope'}' does not exist" in out.stderr
    assert not (tmp_path / "save").exists()
