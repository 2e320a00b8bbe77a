"""Results, predictions, tables and checkpoints are written whole or not at all."""
import json
import os
import stat
from pathlib import Path

import pytest

from fairseq_smlp import atomic_write
from fairseq_smlp.atomic_write import atomic_output, atomic_write_bytes, atomic_write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_text_and_bytes_replace_the_target(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓" and _names(tmp_path) == ["results.json"]
    atomic_write_bytes(str(target), b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and _names(tmp_path) == ["results.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "table.md"
    target.write_text("old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new" * 1000)
    assert target.read_text() == "old" and _names(tmp_path) == ["table.md"]


def test_an_error_inside_the_block_removes_the_temporary(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(ValueError):
        with atomic_output(target) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path)  # same folder: the rename is atomic
            with open(tmp, "w") as f:
                f.write("half")
            raise ValueError("writer failed")
    assert _names(tmp_path) == []


def test_the_file_is_synced_and_the_folder_too(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == [False, True]  # the file before the rename, its folder after


def test_two_writers_never_share_a_temporary_name(tmp_path):
    with atomic_output(tmp_path / "out.jsonl") as first, atomic_output(tmp_path / "out.jsonl") as second:
        assert first != second


def test_new_files_get_the_umask_permissions_and_existing_ones_keep_theirs(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o604)
    atomic_write_text(kept, "y")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604


def test_umask_fallback_agrees_with_proc(monkeypatch):
    """Where /proc is missing the umask is still the process's."""
    expected = atomic_write._current_umask()
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise OSError("no /proc")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert atomic_write._current_umask() == expected


def test_checkpoint_copy_uses_it_and_a_killed_copy_is_cleaned_at_start(tmp_path):
    """atomic_copy (fairseq's checkpoint_last/best copies) writes through atomic_output, and the
    temporary name it would leave after a kill -9 is one remove_stale_temporaries knows."""
    from fairseq_smlp.checkpoints import file_safety

    src, dst = tmp_path / "checkpoint_1_10.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 100)
    file_safety.atomic_copy(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes() and _names(tmp_path) == ["checkpoint_1_10.pt", "checkpoint_last.pt"]
    for _ in range(20):
        with atomic_output(dst) as tmp:
            assert file_safety.TEMPORARY.fullmatch(os.path.basename(tmp)), tmp
    assert not file_safety.TEMPORARY.fullmatch("x.pt.tmp-abc")  # a user's file of a similar name stays


# ------------------------------------------------------------------ reshard (items 6 and 10)
def tiny_checkpoint(path):
    """A plain single-process checkpoint: enough for reshard to copy to N ranks."""
    import torch

    torch.save({"model": {"w": torch.arange(4.0)}, "optimizer_history": [{"num_updates": 3}]}, path)
    return path


def test_reshard_refuses_an_out_without_the_pt_suffix(tmp_path, capsys):
    """Before: `--out re` wrote both ranks to the same file `re` (rank 0 lost)."""
    from fairseq_smlp.checkpoints import reshard

    ckpt = tiny_checkpoint(tmp_path / "ck.pt")
    with pytest.raises(SystemExit) as e:
        reshard.main(["reshard", str(ckpt), "--to-world-size", "2", "--out", str(tmp_path / "re")])
    assert e.value.code == 2
    assert f"--out {tmp_path / 're'}: must end in .pt" in capsys.readouterr().err
    assert _names(tmp_path) == ["ck.pt"]


def test_reshard_names_ranks_from_the_final_suffix_only(tmp_path):
    """A `.pt` in a folder name stays as it is (before: replaced there, a raw traceback)."""
    from fairseq_smlp.checkpoints import reshard

    ckpt = tiny_checkpoint(tmp_path / "ck.pt")
    folder = tmp_path / "runs.pt.d"
    folder.mkdir()
    reshard.main(["reshard", str(ckpt), "--to-world-size", "2", "--out", str(folder / "re.pt")])
    assert _names(folder) == ["re-rank-0.pt", "re-rank-1.pt"]
    assert reshard.output_paths("a.pt/b.pt", 2) == ["a.pt/b-rank-0.pt", "a.pt/b-rank-1.pt"]


def test_a_failed_reshard_write_keeps_the_old_output_and_leaves_no_temporary(tmp_path, monkeypatch):
    import torch

    from fairseq_smlp.checkpoints import reshard

    ckpt = tiny_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "merged.pt"
    out.write_bytes(b"the previous merge")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as h:
            h.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        reshard.reshard([str(ckpt)], 1, str(out))
    assert out.read_bytes() == b"the previous merge" and _names(tmp_path) == ["ck.pt", "merged.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    reshard.reshard([str(ckpt)], 1, str(out))
    assert torch.load(out, weights_only=True)["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


# ------------------------------------------------------------------ zero-shot (items 6 and 7)
class FakeResult:
    def __init__(self, records):
        self.records = records

    def prediction_records(self):
        yield from self.records


def test_zeroshot_output_and_predictions_are_written_whole(tmp_path, monkeypatch):
    """A failure while writing the predictions leaves the previous file (before: truncated)."""
    from types import SimpleNamespace

    from fairseq_smlp.eval import zeroshot

    args = SimpleNamespace(output=str(tmp_path / "results.json"), predictions=str(tmp_path / "predictions.jsonl"))
    zeroshot.write_report(args, {"tasks": {"copa": 1}}, [FakeResult([{"i": 0}, {"i": 1}])])
    assert json.loads((tmp_path / "results.json").read_text()) == {"tasks": {"copa": 1}}
    assert (tmp_path / "predictions.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n'

    def broken():
        yield {"i": 0}
        raise RuntimeError("scoring bug")

    failing = FakeResult([])
    failing.prediction_records = broken
    with pytest.raises(RuntimeError):
        zeroshot.write_report(args, {"tasks": {}}, [failing])
    assert (tmp_path / "predictions.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n'
    assert _names(tmp_path) == ["predictions.jsonl", "results.json"]


def test_zeroshot_dict_copy_is_removed_after_loading(tmp_path, monkeypatch):
    """A --dict not named dict.txt is copied to a temporary folder for fairseq, and that
    folder is gone afterwards (before: one leaked per run)."""
    import tempfile

    from fairseq_smlp.eval import zeroshot

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a 1\n")
    with zeroshot.dict_dir(vocab) as folder:
        assert (Path(folder) / "dict.txt").read_text() == "a 1\n"
    assert not Path(folder).exists() and list((tmp_path / "tmp").iterdir()) == []
    with zeroshot.dict_dir(tmp_path / "dict.txt") as folder:
        assert folder == str(tmp_path)  # named dict.txt: its own folder, nothing copied


def test_rehearsal_data_stays_in_its_own_folder(tmp_path):
    """Before: train.txt / valid.txt were written into REHEARSE_DIR's parent."""
    from fairseq_smlp.rehearse import ptb_data_bin

    out = ptb_data_bin(tmp_path / "run" / "ptb")
    assert _names(tmp_path) == ["run"] and _names(tmp_path / "run" / "ptb") == ["data-bin"] and (out / "valid.bin").exists()
