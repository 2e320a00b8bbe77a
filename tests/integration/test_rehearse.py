"""REHEARSE=1: a recipe's own fairseq-train command at reduced width on 2 gloo
workers, with its --fp16 (fairseq's fp16 path on the CPU), killed with SIGKILL mid-run and
restarted (it must reproduce the uninterrupted run), resharded, evaluated by eval_ppl.sh (==
the last validation perplexity) and eval_zeroshot.sh. CI rehearses sMLP and Base Layers at
W = 2; every recipe at W = 2 and 4 is recipes/rehearse_all.sh (table: recipes/rehearsal.md)."""
import json
import os

import pytest

from conftest import REPO
from fairseq_smlp import rehearse

pytestmark = pytest.mark.slow

RECIPE_ARGS = [  # what recipes/train_lm.sh hands over (train_gpu64.sh), _common.sh's COMMON_ARGS included
    "--arch", "smlp_lm_9b", "--user-dir", str(REPO / "fairseq_smlp"), "--task", "smlp_language_modeling",
    "--criterion", "moe_cross_entropy", "--sample-break-mode", "none", "--required-batch-size-multiple", "1",
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr-scheduler", "polynomial_decay",
    "--fp16", "--fp16-no-flatten-grads", "--fp16-init-scale", "4", "--ddp-backend", "legacy_ddp",
    "--save-interval-updates", "2000", "--keep-interval-updates", "3", "--num-workers", "2",
    "--tokens-per-sample", "1024", "--max-tokens", "8192", "--update-freq", "2", "--max-update", "100000", "--total-num-update", "100000",
]


RECIPES = ["train_gpu32_smlp.sh", "train_gpu32_base.sh"]


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory):
    """{recipe: (finished process, its REHEARSE_DIR)}: both rehearsals side by side (each makes its
    own data-bin under its own folder; their 2 workers run one thread each)."""
    from conftest import finish, start_quietly

    root = tmp_path_factory.mktemp("rehearse")
    started = {}
    for recipe in RECIPES:
        workdir = root / recipe.replace(".sh", "")
        env = dict(os.environ, REHEARSE="1", REHEARSE_WORKERS="2", REHEARSE_DIR=str(workdir))
        started[recipe] = start_quietly(["bash", REPO / "recipes" / recipe], cwd=root, env=env), workdir
    return {recipe: (finish(process), workdir) for recipe, (process, workdir) in started.items()}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_rehearsal_on_two_workers(rehearsals, recipe):
    out, workdir = rehearsals[recipe]
    assert (workdir / "result.json").exists(), out.stdout[-4000:]
    result = json.loads((workdir / "result.json").read_text())
    assert result["precision"] == "fp16" and result["world_size"] == 2 and result["rank_files"]
    assert result["resumed_from"] in (4, 8)  # update 8's checkpoint, or 4 if a rank had not written 8 yet
    assert result["resumed_identical"], "losses or weights after the restart differ from the uninterrupted run"
    assert result["ppl_equal"], (result["eval_ppl"], result["valid_ppl"])
    assert result["zeroshot_ran"]
    assert out.returncode == 0 and result["ok"]


def test_rehearsal_keeps_the_recipe_and_swaps_in_small_sizes():
    args, cfg = rehearse.rehearsal_args(RECIPE_ARGS, 4, 1, "fp16")
    assert cfg.model.tmoe_experts == 4  # one tMoE expert per worker, as on 64 GPUs
    assert (cfg.model.decoder_embed_dim, cfg.model.decoder_layers, cfg.task.tokens_per_sample) == (32, 2, 32)
    assert cfg.common.fp16 and cfg.common.fp16_no_flatten_grads and cfg.common.fp16_init_scale == 4
    assert cfg.distributed_training.ddp_backend == "legacy_ddp" and cfg.optimization.update_freq == [2]
    assert cfg.checkpoint.keep_interval_updates == 3 and cfg.checkpoint.save_interval_updates == rehearse.SAVE_EVERY
    assert cfg.optimization.max_update == rehearse.UPDATES and str(cfg.lr_scheduler._name) == "polynomial_decay"
    bf16 = rehearse.rehearsal_args(RECIPE_ARGS, 2, 1, "bf16")[1]
    assert bf16.common.bf16 and not bf16.common.fp16 and bf16.model.tmoe_experts == 2
    fp32 = rehearse.rehearsal_args(RECIPE_ARGS, 2, 1, "fp32")[1]
    assert not fp32.common.fp16 and not fp32.common.bf16


def test_rehearsal_gives_transformer_moes_one_expert_per_worker():
    switch = [a if a != "smlp_lm_9b" else "switch_lm_9b" for a in RECIPE_ARGS]
    cfg = rehearse.rehearsal_args(switch, 4, 1, "fp16")[1]
    assert cfg.model.moe_experts == 4 and cfg.model.moe_expert_ffn_dim == 64 and cfg.model.decoder_input_dim == 32


def test_results_table(tmp_path):
    rows = [dict(recipe="train_gpu64", world_size=2, device="cpu", precision="fp16", resumed_from=8, resumed_identical=True,
                 valid_ppl=939.6, eval_ppl=939.6, ppl_equal=True, zeroshot_ran=True, seconds=120),
            dict(recipe="train_gpu64_base", world_size=4, device="cpu", precision="fp16", resumed_from=4, resumed_identical=False,
                 valid_ppl=700.1, eval_ppl=None, ppl_equal=False, zeroshot_ran=False, seconds=90)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = rehearse.table(tmp_path / "r.jsonl").splitlines()
    assert lines[2] == "| train_gpu64 | 2 | cpu | fp16 | 8 | yes | 939.6 | 939.6 | yes | yes | 120 |"
    assert lines[3] == "| train_gpu64_base | 4 | cpu | fp16 | 4 | **NO** | 700.1 | - | **NO** | **NO** | 90 |"
