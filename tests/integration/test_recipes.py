"""Every recipe passes DRY_RUN=1 (fairseq parses it, experts fit the GPUs, the model builds)
and refuses clearly, writing nothing, when its data path is missing, a number is not a number,
a multi-node run lacks its address, or resharding fails."""
import os
import subprocess

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


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """{recipe: (finished process, its folder)}: every recipe's DRY_RUN=1, side by side (each a
    single-threaded build of a full-size model), each in a folder of its own."""
    from conftest import run_side_by_side

    folders = {recipe: tmp_path_factory.mktemp(recipe.replace(".sh", "")) for recipe in TRAIN_RECIPES}
    commands = {  # each in its own folder, as run_recipe runs one
        recipe: ["env", "DRY_RUN=1", f"SAVE_DIR={folders[recipe] / 'save'}", "bash", "-c", 'cd "$0" && exec bash "$1"',
                 folders[recipe], REPO / "recipes" / recipe]
        for recipe in TRAIN_RECIPES
    }
    finished = run_side_by_side(commands, cwd=REPO)
    return {recipe: (finished[recipe], folders[recipe]) for recipe in TRAIN_RECIPES}


@pytest.mark.parametrize("recipe", TRAIN_RECIPES)
def test_dry_run(dry_runs, recipe):
    out, folder = dry_runs[recipe]
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "+ python -m fairseq_smlp.dry_run" in log  # the full command is printed
    assert "dry run OK" in log
    assert not (folder / "save").exists()


def test_gpu64_recipe_is_the_9b_model_with_one_expert_per_gpu(dry_runs):
    log = dry_runs["train_gpu64.sh"][0].stdout
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


def test_base_layers_count_one_expert_per_gpu(dry_runs):
    log = dry_runs["train_gpu64_base.sh"][0].stdout
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


def run_script(name, tmp_path, *args, **env):
    """A recipe with arguments after its name, in a clean environment of its own."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NODE_RANK", "SLURM_JOB_ID", "EXTRA_ARGS")}
    full_env.update(SAVE_DIR=str(tmp_path / "save"), **env)
    return subprocess.run(["bash", str(REPO / "recipes" / name), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variable", ["GPUS", "MAX_TOKENS", "UPDATE_FREQ", "GPUS_PER_NODE", "WARMUP"])
def test_integer_variables_are_checked_before_bash_arithmetic(variable, tmp_path):
    """Before: `$(( GPUS * ... ))` evaluated 'a[$(touch PWNED)]' and ran the command."""
    out = run_script("train_gpu64.sh", tmp_path, DRY_RUN="1", **{variable: "a[$(touch PWNED)]"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"error: {variable}='a[$(touch PWNED)]' is not a whole number" in out.stderr
    assert not (tmp_path / "PWNED").exists() and "dry_run" not in out.stdout


def test_zero_gpus_per_node_is_refused(tmp_path):
    out = run_script("train_gpu64.sh", tmp_path, DRY_RUN="1", GPUS_PER_NODE="0")
    assert out.returncode == 2 and "GPUS_PER_NODE=0 must be at least 1" in out.stderr


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "NODE_RANK"])
def test_multi_node_run_refuses_to_start_without_master_addr_and_node_rank(missing, tmp_path):
    """Before: 127.0.0.1 / rank 0 were used silently and every node waited for the others forever."""
    env = dict(MASTER_ADDR="10.0.0.1", NODE_RANK="0")
    del env[missing]
    out = run_script("train_gpu64.sh", tmp_path, DATA=str(tmp_path), **env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "spans 8 nodes" in out.stderr and "set MASTER_ADDR" in out.stderr and "NODE_RANK" in out.stderr
    assert "torchrun" not in out.stdout and not (tmp_path / "save").exists()


def test_node_rank_must_be_a_number(tmp_path):
    out = run_script("train_gpu64.sh", tmp_path, DATA=str(tmp_path), MASTER_ADDR="10.0.0.1", NODE_RANK="x")
    assert out.returncode == 2 and "error: NODE_RANK='x' is not a whole number" in out.stderr


def test_quoted_option_after_the_recipe_reaches_fairseq_whole(tmp_path):
    """`bash recipes/X.sh --adam-betas "(0.9, 0.999)"`: one argument (EXTRA_ARGS split it in three)."""
    out = run_script("train_gpu32_transformer.sh", tmp_path, "--adam-betas", "(0.9, 0.999)", DRY_RUN="1")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "dry run OK" in out.stdout
    assert "--adam-betas (0.9, 0.999)" in out.stdout.split("+ python -m fairseq_smlp.dry_run")[1].splitlines()[0]


def test_a_quote_in_extra_args_is_refused_with_the_way_that_works(tmp_path):
    out = run_script("train_gpu64.sh", tmp_path, DRY_RUN="1", EXTRA_ARGS='--adam-betas "(0.9, 0.999)"')
    assert out.returncode == 2
    assert "error: EXTRA_ARGS=" in out.stderr and 'bash recipes/<recipe>.sh --adam-betas "(0.9, 0.999)"' in out.stderr


def test_simple_extra_args_are_split_on_spaces(tmp_path):
    out = run_script("train_gpu64.sh", tmp_path, DATA=str(tmp_path / "nope"), EXTRA_ARGS="--seed 3")
    assert out.returncode == 2  # refused for DATA, after EXTRA_ARGS was accepted
    assert "EXTRA_ARGS" not in out.stderr and "DATA=" in out.stderr


@pytest.mark.parametrize("recipe", ["eval_ppl.sh", "eval_zeroshot.sh"])
def test_a_failed_reshard_fails_the_evaluation_and_no_stale_file_is_evaluated(recipe, tmp_path):
    """Rank files that cannot be resharded (corrupt) and an older merged file beside them:
    before, `CKPT=$(...)` dropped the failure and the old file was evaluated with exit 0."""
    ckpt = tmp_path / "checkpoint_best.pt"
    for name in ("checkpoint_best.pt", "checkpoint_best-rank-0.pt", "checkpoint_best-rank-1.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    stale = tmp_path / "checkpoint_best-world1.pt"
    stale.write_bytes(b"an older merge")
    out = run_script(recipe, tmp_path, CKPT=str(ckpt), DATA=str(tmp_path), ZEROSHOT_DIR=str(tmp_path), CPU="1")
    assert out.returncode != 0, out.stdout + out.stderr
    assert f"error: resharding {ckpt} to one worker failed" in out.stderr
    assert "fairseq-eval-lm" not in out.stdout and "fairseq-smlp-zeroshot" not in out.stdout
    assert stale.read_bytes() == b"an older merge"
