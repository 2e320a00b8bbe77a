"""Loading a checkpoint never runs code from it.

A checkpoint whose pickle carries a payload (os.system touching a marker file) is given to
every entry point that loads checkpoints: each refuses it with one line naming the file and
the global, and the marker never appears. Every format the project writes still loads, a
truncated file is called corrupt without being unpickled, and the user's opt-out works.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fairseq_smlp.checkpoints import rank_files, reshard
from fairseq_smlp.checkpoints.file_safety import CorruptCheckpointError
from fairseq_smlp.checkpoints.safe_load import UnsafeCheckpointError, load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {k: v for k, v in os.environ.items() if k not in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "SMLP_TRUST_CHECKPOINTS", "SMLP_DEBUG")}
ENV["OMP_NUM_THREADS"] = "1"
TINY = [
    "--arch", "smlp_lm_tiny", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "16",
    "--smoe-experts", "2", "--tmoe-experts", "2", "--tokens-per-sample", "16", "--criterion", "moe_cross_entropy",
    "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "256", "--cpu", "--no-epoch-checkpoints",
    "--num-workers", "0", "--required-batch-size-multiple", "1", "--disable-validation", "--seed", "1",
]


class Payload:
    """Unpickling this runs `touch MARKER` (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run(cmd, env=None, cwd=REPO):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=300)


def train(data_bin, save_dir, *extra, updates=2, env=None):
    cmd = ["fairseq-train", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", *TINY,
           "--max-update", str(updates), "--save-dir", save_dir, *extra]
    out = run(cmd, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return Path(save_dir) / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    """One tiny sMLP checkpoint, fp32, 2 updates."""
    return train(data_bin, tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def evil(trained, tmp_path_factory):
    """(checkpoint, marker): the trained checkpoint with a payload in its extra_state."""
    folder = tmp_path_factory.mktemp("evil")
    state = load_checkpoint_file(trained, mmap=False)
    state["extra_state"]["payload"] = Payload(folder / "MARKER")
    torch.save(state, folder / "checkpoint_last.pt")
    return folder / "checkpoint_last.pt", folder / "MARKER"


def assert_refused(out, evil):
    """Non-zero exit, one line naming the file and the refused global, no traceback, no marker."""
    path, marker = evil
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert str(path) in lines[-1] and "posix.system" in lines[-1] and "SMLP_TRUST_CHECKPOINTS=1" in lines[-1], lines[-1]
    assert not marker.exists()


# ------------------------------------------------------------------ the payload, at every entry point
@pytest.fixture(scope="module")
def refusals(data_bin, evil, tmp_path_factory):
    """{entry point: (finished process, its own folder)}: every command handed the payload,
    side by side (independent; most of each is start-up)."""
    from conftest import run_side_by_side

    root = tmp_path_factory.mktemp("refusals")
    folders = {name: root / name for name in ("eval_lm", "resume", "reshard", "zeroshot", "export", "debug")}
    for folder in folders.values():
        folder.mkdir()
    (folders["resume"] / "checkpoint_last.pt").write_bytes(evil[0].read_bytes())
    task = folders["zeroshot"] / "task.jsonl"
    task.write_text(json.dumps({"context": "the market", "choices": ["rose", "fell"], "label": 0}) + "\n")
    reshard = [sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", evil[0]]
    commands = {
        "eval_lm": ["fairseq-eval-lm", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
                    "--path", evil[0], "--tokens-per-sample", "16", "--cpu"],
        "resume": ["fairseq-train", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", *TINY,
                   "--max-update", "4", "--save-dir", folders["resume"]],
        "reshard": reshard + ["--to-world-size", "2", "--out", folders["reshard"] / "r.pt"],
        "zeroshot": ["fairseq-smlp-zeroshot", "--path", evil[0], "--task-file", f"tiny={task}", "--dict", data_bin / "dict.txt", "--cpu"],
        "export": [sys.executable, "-m", "fairseq_smlp.export_hf", evil[0], "--out", folders["export"] / "hf", "--dict", data_bin / "dict.txt", "--no-verify"],
    }
    finished = run_side_by_side(commands, cwd=REPO, env=ENV)
    finished.update(run_side_by_side({"debug": reshard + ["--to-world-size", "1", "--out", folders["debug"] / "r.pt"]},
                                     cwd=REPO, env=dict(ENV, SMLP_DEBUG="1")))
    return {name: (finished[name], folders[name]) for name in commands | {"debug": None}}


def test_eval_lm_refuses_the_payload(refusals, evil):
    out = refusals["eval_lm"][0]
    assert_refused(out, evil)
    assert out.stderr.splitlines()[-1].startswith("fairseq-eval-lm: error: checkpoint ")


def test_resume_refuses_the_payload(refusals, evil):
    out, folder = refusals["resume"]
    assert_refused(out, (folder / "checkpoint_last.pt", evil[1]))
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_last.pt"]


def test_reshard_refuses_the_payload(refusals, evil):
    out, folder = refusals["reshard"]
    assert_refused(out, evil)
    assert list(folder.iterdir()) == []


def test_zeroshot_refuses_the_payload(refusals, evil):
    assert_refused(refusals["zeroshot"][0], evil)


def test_lm_eval_adapter_refuses_the_payload(data_bin, evil):
    from fairseq_smlp.eval.harness import FairseqLM

    with pytest.raises(UnsafeCheckpointError, match=r"needs global posix\.system") as e:
        FairseqLM(str(evil[0]), dict=str(data_bin / "dict.txt"), device="cpu")
    assert str(evil[0]) in str(e.value) and not evil[1].exists()


def test_export_refuses_the_payload(refusals, evil):
    out, folder = refusals["export"]
    assert_refused(out, evil)
    assert not (folder / "hf").exists()


def test_debug_variable_shows_the_stack(refusals, evil):
    out = refusals["debug"][0]
    assert out.returncode != 0 and "Traceback" in out.stderr and "UnsafeCheckpointError" in out.stderr
    assert not evil[1].exists()


def test_the_users_opt_out_loads_a_trusted_file(evil, monkeypatch):
    """SMLP_TRUST_CHECKPOINTS=1, set by the user: the file is unpickled as it is (payload included)."""
    monkeypatch.setenv("SMLP_TRUST_CHECKPOINTS", "1")
    state = load_checkpoint_file(evil[0])
    assert "model" in state and evil[1].exists()
    evil[1].unlink()


def test_importing_the_plugin_changes_no_loading_default():
    out = run([sys.executable, "-c", "import fairseq_smlp, os; print(os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'))"])
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "None", out.stderr[-2000:]


# ------------------------------------------------------------------ what the project writes still loads
def test_fairseq_checkpoints_need_no_allowed_global(trained):
    from fairseq import checkpoint_utils

    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(trained)) == []
    state = checkpoint_utils.load_checkpoint_to_cpu(str(trained))
    assert state["model"]["decoder.embed_tokens.weight"].dtype == torch.float32 and state["dictionary"]["size"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16_rehearsal"])
def test_half_precision_checkpoints_load(data_bin, tmp_path, precision):
    flags, env = (["--bf16"], None) if precision == "bf16" else (["--fp16", "--fp16-no-flatten-grads"], dict(ENV, SMLP_CPU_FP16="1"))
    ckpt = train(data_bin, tmp_path, *flags, env=env)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt)) == []
    state = load_checkpoint_file(ckpt)
    assert state["optimizer_history"][-1]["num_updates"] == 2


def test_rank_files_and_resharded_files_load(trained, tmp_path):
    two = reshard.reshard([str(trained)], 2, str(tmp_path / "two.pt"))
    for path in two:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        assert rank_files.updates_in(path) == 2
    one = reshard.reshard(two, 1, str(tmp_path / "one.pt"))
    a, b = load_checkpoint_file(trained), load_checkpoint_file(one[0])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def old_format(trained, path, **fields):
    """The trained state with `args` / `cfg` as fairseq < 0.12 stored them."""
    state = load_checkpoint_file(trained, mmap=False)
    state.update(fields)
    torch.save(state, path)
    return path


def test_old_format_with_args_namespace_loads(trained, tmp_path):
    from omegaconf import OmegaConf

    args = argparse.Namespace(arch="smlp_lm_tiny", data="data-bin", lr=[0.003], adam_betas="(0.9, 0.98)")
    path = old_format(trained, tmp_path / "args.pt", args=args)
    assert "argparse.Namespace" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert load_checkpoint_file(path)["args"] == args
    state = load_checkpoint_file(trained, mmap=False)
    dictconfig = old_format(trained, tmp_path / "cfg.pt", cfg=OmegaConf.create(state["cfg"]))
    assert "omegaconf.dictconfig.DictConfig" in torch.serialization.get_unsafe_globals_in_checkpoint(str(dictconfig))
    from fairseq import checkpoint_utils

    assert checkpoint_utils.load_checkpoint_to_cpu(str(dictconfig))["cfg"].model._name == "smlp_lm_tiny"


def test_good_checkpoint_loads_with_torch_forced_to_weights_only(trained, tmp_path, monkeypatch):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 set by the user: a good (old-format) file was called corrupt."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    state = load_checkpoint_file(trained, mmap=False)
    path = old_format(trained, tmp_path / "cfg.pt", cfg=OmegaConf.create(state["cfg"]))
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    assert checkpoint_utils.load_checkpoint_to_cpu(str(path))["cfg"].model._name == "smlp_lm_tiny"
    assert load_checkpoint_file(trained)["cfg"]["model"]["_name"] == "smlp_lm_tiny"


# ------------------------------------------------------------------ corrupt files
def test_truncated_file_is_corrupt_without_being_unpickled(evil, tmp_path, monkeypatch):
    """The payload's pickle (data.pkl) is whole, the archive is cut: named as corrupt, never run."""
    data = evil[0].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) - 200])
    calls, real = [], torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {cut} .* is truncated or corrupted"):
        load_checkpoint_file(cut)
    assert calls and all(w is True for w in calls) and not evil[1].exists()


def test_truncated_file_is_one_line_in_eval_lm(data_bin, trained, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained.read_bytes()[:5000])
    out = run(["fairseq-eval-lm", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
               "--path", cut, "--tokens-per-sample", "16", "--cpu"])
    last = out.stderr.splitlines()[-1]
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert last.startswith(f"fairseq-eval-lm: error: checkpoint {cut}") and "truncated or corrupted" in last


# ------------------------------------------------------------------ export: the dictionary is always compared
def test_export_no_verify_refuses_a_same_size_other_dictionary(data_bin, trained, tmp_path):
    from fairseq_smlp.export_hf.convert import ExportError
    from fairseq_smlp.export_hf.export import export

    lines = (data_bin / "dict.txt").read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    other = tmp_path / "dict.txt"
    other.write_text("\n".join(lines) + "\n")
    with pytest.raises(ExportError, match=f"--dict {other} is not the dictionary the checkpoint was trained with"):
        export(str(trained), str(tmp_path / "hf"), dict_path=str(other), verify=False)
    assert not (tmp_path / "hf").exists()
