"""Every change fairseq_patches.py makes to fairseq, one test each (end-to-end tests of the
same behaviour live in test_resume.py, test_bad_input.py and test_distributed.py)."""
import copy
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fairseq_smlp  # noqa: F401  (installs the patches)
from fairseq_smlp.checkpoints import resume
from fairseq_smlp.errors import own_cause
from fairseq_smlp.moe.fairseq_base_layer import base_layer_as_only_worker
from fairseq_smlp.optim.cpu_adamw import CpuFusedAdamW
from fairseq_smlp.checkpoints import file_safety
from fairseq_smlp.checkpoints.file_safety import CorruptCheckpointError


def test_numpy2_keeps_the_alias_fairseq_reads():
    assert np.compat.long is np.int64


def test_importing_the_plugin_leaves_torch_loading_safe():
    """The plugin set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 at import: every torch.load in the
    process (the user's own code too) could then run a pickle's code."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    code = "import fairseq_smlp, os; print(os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "None"


def test_save_dir_is_checked_but_not_created(tmp_path):
    from fairseq import checkpoint_utils

    checkpoint_utils.verify_checkpoint_directory(str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="--save-dir"):
        checkpoint_utils.verify_checkpoint_directory(str(tmp_path / "file" / "sub"))


def test_checkpoint_copy_is_atomic(tmp_path, monkeypatch):
    """A failure in the middle of the copy leaves the old destination whole and no temp file."""
    from fairseq.file_io import PathManager

    src, dst = tmp_path / "new.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt", "new.pt"]
    monkeypatch.undo()
    assert PathManager.copy(str(src), str(dst), overwrite=True) and dst.read_bytes() == src.read_bytes()


def test_corrupt_checkpoint_is_named(tmp_path):
    from fairseq import checkpoint_utils

    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


@pytest.mark.parametrize("sharded", [False, True])
def test_trainer_saves_rank_files_only_with_sharded_experts(sharded):
    """fairseq saves on rank 0 under one name; with sharded experts every rank saves -rank-R."""
    from fairseq.trainer import Trainer

    class RankOne(Trainer):  # only the patched members run; fairseq's properties shadowed
        data_parallel_rank, is_fsdp, is_data_parallel_master = 1, False, False

        def __init__(self):
            self.cfg = SimpleNamespace(checkpoint=SimpleNamespace(checkpoint_suffix=""), model=SimpleNamespace(base_layers=0))
            self.has_sharded_experts = sharded

    trainer = RankOne()
    assert trainer.checkpoint_suffix == ("-rank-1" if sharded else "")
    assert trainer.should_save_checkpoint_on_current_rank == sharded


def test_plain_log_line_keeps_the_routing_summary():
    """Per-layer routing figures stay out of the simple/tqdm line; the JSON log keeps them."""
    from fairseq.logging import progress_bar

    stats = {"loss": 3.5, "moe_load_max": 1.25, "moe/L1_feature_moe_load_max": 1.5}
    simple = progress_bar.SimpleProgressBar([], epoch=1, log_interval=1)
    assert set(simple._format_stats(stats)) == {"loss", "moe_load_max"}
    json_bar = progress_bar.JsonProgressBar([], epoch=1, log_interval=1)
    assert "moe/L1_feature_moe_load_max" in json_bar._format_stats(stats)


def _expert_overflow_worker(rank, port, out):
    import torch.distributed as dist
    from fairseq import utils

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shared, expert = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    expert.expert = True
    shared.grad, expert.grad = torch.ones(3), torch.ones(2)
    if rank == 1:
        expert.grad[0] = float("inf")  # only rank 1's expert overflowed
    norms = [utils.clip_grad_norm_([shared, expert], 0.0).item()]
    expert.grad[0] = 1.0
    norms.append(utils.clip_grad_norm_([shared, expert], 0.0).item())
    torch.save(norms, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_overflow_in_one_ranks_expert_gradient_is_an_overflow_on_every_rank(tmp_path):
    """fairseq's grad norm leaves expert gradients out (so the fp16 loss scaler never saw an
    inf there, and the expert's weights became inf); now the norm is inf on every rank, so all
    ranks skip the step together (an expert differs per rank, shared weights must not)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_expert_overflow_worker, args=(port, str(tmp_path / "norms")), nprocs=2, start_method="spawn")
    for rank in range(2):
        first, second = torch.load(tmp_path / f"norms.{rank}")
        assert first == float("inf")
        assert abs(second - 3 ** 0.5) < 1e-6  # clean: the norm of the shared gradient, as fairseq's


def one_process_trainer(sharded=False):
    return SimpleNamespace(checkpoint_suffix="", data_parallel_world_size=1, data_parallel_rank=0, has_sharded_experts=sharded)


def checkpoint_config(**fields):
    from omegaconf import OmegaConf

    base = dict(restore_file="checkpoint_last.pt", save_dir="ckpts", finetune_from_model=None, load_checkpoint_on_all_dp_ranks=False)
    return OmegaConf.create({**base, **fields})


def test_resume_explicit_restore_file_must_exist(tmp_path):
    """fairseq trained from scratch (and overwrote checkpoint_last.pt) when --restore-file did
    not exist; the patched load_checkpoint stops before anything is built or written."""
    from fairseq import checkpoint_utils

    missing = str(tmp_path / "checkpoint_9_99.pt")
    with pytest.raises(FileNotFoundError, match=rf"--restore-file {missing}: {missing} does not exist"):
        checkpoint_utils.load_checkpoint(checkpoint_config(restore_file=missing), one_process_trainer())
    cfg = checkpoint_config(save_dir=str(tmp_path))  # the default restore file, no checkpoint yet: a first launch
    assert resume.resume_config(cfg, one_process_trainer()) is cfg


def test_resume_takes_a_rank_files_name_on_disk(tmp_path):
    """With rank files, --restore-file checkpoint_1_20-rank-0.pt stands for checkpoint_1_20.pt
    (fairseq appends each rank's suffix; it looked for ...-rank-0-rank-0.pt)."""
    torch.save({"optimizer_history": [{"num_updates": 20}]}, tmp_path / "checkpoint_1_20-rank-1.pt")
    trainer = SimpleNamespace(checkpoint_suffix="-rank-1", data_parallel_world_size=2, data_parallel_rank=1, has_sharded_experts=True)
    cfg = checkpoint_config(restore_file=str(tmp_path / "checkpoint_1_20-rank-0.pt"))
    gathered = []

    def gather(obj, trainer):  # what rank 0 would contribute: the same update
        gathered.append(obj)
        return [(str(tmp_path / "checkpoint_1_20-rank-0.pt"), 20), obj]

    original, resume.gather = resume.gather, gather
    try:
        resolved = resume.resume_config(cfg, trainer)
    finally:
        resume.gather = original
    assert resolved.restore_file == str(tmp_path / "checkpoint_1_20.pt")
    assert gathered == [(str(tmp_path / "checkpoint_1_20-rank-1.pt"), 20)]


def test_fp16_master_weights_travel_with_the_optimizer_state():
    """--fp16 keeps fp32 master copies that fairseq's checkpoint left out: a resume rebuilt
    them from the fp16 weights (rounded) and the run drifted. Now they are saved and restored."""
    from fairseq import optim, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = ["/data", "--task", "language_modeling", "--arch", "transformer_lm", "--optimizer", "adam", "--lr", "0.01",
            "--fp16", "--fp16-no-flatten-grads", "--cpu"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    weight = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.float16))
    optimizer = optim.FP16Optimizer.build_optimizer(cfg, [weight])
    optimizer.fp32_params[0].data.add_(1e-4)  # an update too small for fp16: lives in the master copy only
    assert torch.equal(weight.data.float(), torch.ones(4))
    state = optimizer.state_dict()
    assert torch.equal(state["fp32_master"][0], torch.full((4,), 1.0001))

    resumed = optim.FP16Optimizer.build_optimizer(cfg, [torch.nn.Parameter(weight.data.clone())])  # master from fp16: 1.0
    resumed.load_state_dict(state)
    assert torch.equal(resumed.fp32_params[0].data, torch.full((4,), 1.0001))
    assert "fp32_master" in state  # the caller's dict is left whole


def fake_trainer(save_fails):
    from fairseq.trainer import Trainer

    class Fake(Trainer):
        has_sharded_experts = True  # saves on this rank without asking the process group
        cfg = None

        def __init__(self):
            pass

        def state_dict(self):
            if save_fails:
                raise OSError("No space left on device")
            return {"extra_state": {}}

    return Fake()


def test_a_failed_crash_save_does_not_replace_the_real_error(tmp_path, caplog):
    """fairseq saves crash.pt while handling the error that stopped training; if that save
    fails, the user saw the save's error instead of the real one."""
    trainer = fake_trainer(save_fails=True)
    with caplog.at_level(logging.ERROR):
        assert trainer.save_checkpoint(str(tmp_path / "crash.pt"), {}) is None
    assert "could not save" in caplog.text and "No space left on device" in caplog.text and "the error that stopped training follows" in caplog.text
    with pytest.raises(OSError, match="No space left"):  # every other save still fails loudly
        trainer.save_checkpoint(str(tmp_path / "checkpoint_last.pt"), {})


def test_crash_save_creates_the_save_dir_late(tmp_path):
    trainer = fake_trainer(save_fails=False)
    trainer.cfg = type("Cfg", (), {"checkpoint": type("C", (), {"write_checkpoints_asynchronously": False})})()
    path = tmp_path / "not" / "yet" / "crash.pt"
    trainer.save_checkpoint(str(path), {})
    assert path.is_file() and not (path.parent / "crash.pt.tmp").exists()


STALE = ["checkpoint_last.pt.tmp", "checkpoint_3_120.pt.tmp", "crash.pt.tmp", "checkpoint_last.pt.tmp-4242",
         "checkpoint_best-rank-1.pt.tmp", "merged.pt.tmp"]
KEPT = ["checkpoint_last.pt", "checkpoint_3_120.pt", "notes.tmp", "model.pt.tmp.bak", "x.pt.tmp-abc", "train.log", "tmp"]


def test_stale_temporaries_and_nothing_else_are_removed_at_start(tmp_path):
    from fairseq import checkpoint_utils

    for name in STALE + KEPT:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.pt.tmp").mkdir()  # only files
    checkpoint_utils.verify_checkpoint_directory(str(tmp_path))  # what fairseq-train runs at start
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(KEPT + ["folder.pt.tmp"])
    assert file_safety.remove_stale_temporaries(str(tmp_path / "missing")) == []


def test_every_fairseq_command_checks_its_numbers_first(monkeypatch):
    """call_main (every fairseq command) refuses a number out of range with the flag named,
    before `main` runs and without a traceback."""
    from fairseq.distributed import utils as distributed_utils

    from fairseq_smlp.dry_run import parse_fairseq_args

    cfg = parse_fairseq_args(["DATA", "--arch", "smlp_lm_tiny", "--task", "smlp_language_modeling", "--dropout", "1.5", "--cpu"])
    monkeypatch.setattr("sys.argv", ["fairseq-train"])
    ran = []
    with pytest.raises(SystemExit) as e:
        distributed_utils.call_main(cfg, lambda cfg: ran.append(cfg))
    assert str(e.value.code) == "fairseq-train: error: --dropout must be in [0, 1), got 1.5" and not ran


def test_checkpoints_record_and_return_their_dictionary(tmp_path):
    """Trainer.state_dict stores the dictionary's record (test_bad_input.py checks a real
    checkpoint); load_checkpoint_to_cpu hands it to the model's load_state_dict."""
    from fairseq import checkpoint_utils

    from conftest import tiny_dictionary
    from fairseq_smlp.models.vocabulary import fingerprint

    record = fingerprint(tiny_dictionary(40))
    state = {"model": {"w": torch.zeros(2)}, "dictionary": record, "args": None, "cfg": None, "last_optimizer_state": None,
             "extra_state": {"train_iterator": {"epoch": 1}},
             "optimizer_history": [{"criterion_name": "C", "optimizer_name": "O", "lr_scheduler_state": {"best": None}, "num_updates": 0}]}
    torch.save(state, tmp_path / "c.pt")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "c.pt"))
    assert state["model"].dictionary == record and list(state["model"]) == ["w"]
    del state["optimizer_history"]
    state["model"] = dict(state["model"])  # as saved: a plain dict (a ModelState is no weights-only type)
    torch.save(state, tmp_path / "old.pt")  # readable, but fairseq's upgrade fails: not called corrupt
    with pytest.raises(KeyError, match="best_loss"):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "old.pt"))


def test_fairseq_generic_load_error_gives_way_to_the_plugin_cause():
    try:
        try:
            raise ValueError("dictionary mismatch: ...")
        except ValueError:
            raise Exception("Cannot load model parameters from checkpoint x.pt; please ensure that the architectures match.")
    except Exception as e:
        generic = e
    assert str(own_cause(generic)) == "dictionary mismatch: ..."
    try:
        try:
            raise RuntimeError("size mismatch")
        except RuntimeError:
            raise Exception("Cannot load model parameters from checkpoint x.pt")
    except Exception as e:
        assert own_cause(e) is None  # torch's own errors keep fairseq's wording and context


def test_base_layer_runs_as_the_only_worker_without_changing_fairseq_outside():
    """fairseq's BaseLayer calls torch.distributed's all-to-all: inside the scoped patch (no
    process group) it is an all-to-all that keeps every row, and fairseq's own is back once it ends."""
    from fairseq.modules import base_layer

    all2all = base_layer.All2All
    x = torch.randn(5, 3, requires_grad=True)
    with base_layer_as_only_worker():
        y = base_layer.All2All.apply(x, [5], [5])
        y.sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.ones_like(x))
    assert base_layer.All2All is all2all


def adam_config(*flags):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = ["/data", "--task", "language_modeling", "--arch", "transformer_lm", "--optimizer", "adam", "--lr", "0.01",
            "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01", "--cpu", *flags]
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))


def adam_steps(optimizer, weights, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=g)
        optimizer.step()


def test_cpu_adam_is_torch_fused_adamw_with_fairseqs_updates():
    """fairseq's CPU Adam is a Python loop of whole-tensor passes; fp32 CPU parameters get torch's
    fused AdamW, which takes the same steps (eps aside) and resumes from fairseq's own state."""
    from fairseq import optim
    from fairseq.optim.adam import Adam

    def weights():
        return [torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4)), torch.nn.Parameter(torch.ones(5))]

    fused_w, old_w = weights(), weights()
    fused = optim.build_optimizer(adam_config().optimizer, fused_w)
    old = optim.build_optimizer(adam_config("--use-old-adam").optimizer, old_w)
    assert type(fused.optimizer) is CpuFusedAdamW and fused.supports_flat_params
    assert type(old.optimizer) is Adam
    adam_steps(fused, fused_w, 5)
    adam_steps(old, old_w, 5)
    for a, b, start in zip(fused_w, old_w, weights()):
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, start, atol=1e-3)  # moved, and alike

    # a checkpoint written by fairseq's Adam (integer steps) resumes under the fused one
    resumed_w = [torch.nn.Parameter(w.detach().clone()) for w in old_w]
    resumed = optim.build_optimizer(adam_config().optimizer, resumed_w)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))  # as from a file: no tensor shared with `old`
    assert all(group["fused"] for group in resumed.optimizer.param_groups)
    adam_steps(resumed, resumed_w, 3, seed=1)
    adam_steps(old, old_w, 3, seed=1)
    for a, b in zip(resumed_w, old_w):
        assert torch.allclose(a, b, atol=1e-6)


def test_half_precision_parameters_keep_fairseqs_adam():
    """fairseq's Adam keeps fp32 state for fp16 weights (--memory-efficient-fp16); torch's fused
    one would keep it in fp16: those stay with fairseq's."""
    from fairseq import optim
    from fairseq.optim.adam import Adam

    optimizer = optim.build_optimizer(adam_config().optimizer, [torch.nn.Parameter(torch.ones(4, dtype=torch.float16))])
    assert type(optimizer.optimizer) is Adam
