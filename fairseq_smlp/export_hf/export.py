"""Export a checkpoint to a transformers folder, then check that transformers reproduces fairseq.

    export(CKPT, OUT)  ->  OUT/config.json, model.safetensors, generation_config.json,
                           the tokenizer files, and (sMLP, gMLP, MoE) the modelling code
"""
import json
import os
import shutil
import tempfile
import time
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ..models import vocabulary
from .convert import (
    ExportError, build_hf_model, load_checkpoint, plan_export, single_worker_checkpoint, skip_broken_torchaudio,
)
from .tokenizer import GPT2, load_dictionary, looks_like_gpt2, save_tokenizer

VERIFY_TOLERANCE = 1e-4  # max |logit difference| accepted in fp32 (measured differences are ~1e-6)
MARKER = "fairseq_smlp_export.json"  # written into every export: what --overwrite may replace


def data_dir(state) -> Optional[str]:
    data = state["cfg"]["task"].get("data") if "task" in state["cfg"] else None
    return str(data).split(os.pathsep)[0] if data else None


def default_dict(state) -> str:
    data = data_dir(state)
    path = os.path.join(data, "dict.txt") if data else None
    if not path or not os.path.isfile(path):
        raise ExportError(
            f"the training dictionary {path or '(no data path in the checkpoint)'} is not there: "
            "pass --dict DATA_BIN/dict.txt"
        )
    return path


def default_spm_model(state) -> Optional[str]:
    """data_prep writes OUT/spm.model next to OUT/data-bin."""
    data = data_dir(state)
    path = os.path.join(os.path.dirname(os.path.abspath(data)), "spm.model") if data else None
    return path if path and os.path.isfile(path) else None


def check_dictionary(state, dictionary, dict_file: str) -> None:
    """The tokenizer written must be the training one, with or without --no-verify: compare
    the dictionary record the checkpoint holds (models/vocabulary.py) with the one exported."""
    saved = state.get("dictionary")
    mine = vocabulary.fingerprint(dictionary)
    if saved and saved.get("sha256") != mine["sha256"]:
        if saved.get("symbols"):
            detail = vocabulary.first_differences(saved["symbols"], mine["symbols"])
        else:
            detail = "other content"
        raise ExportError(
            f"--dict {dict_file} is not the dictionary the checkpoint was trained with ({detail}): "
            "pass the training dict.txt"
        )


def fairseq_model(state, dictionary):
    """The checkpoint's fairseq model in evaluation mode (what the export must reproduce)."""
    from fairseq import models

    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary, scores_partial_prediction=True)
    model = models.build_model(state["cfg"]["model"], task)
    model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"]["model"])
    return model.float().eval()


def load_exported(out_dir: str):
    skip_broken_torchaudio()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True, dtype=torch.float32).eval()


def max_logit_difference(state, dictionary, out_dir: str, length: int = 32, seed: int = 0) -> float:
    """max |fairseq logits - exported logits| on random token ids (2 sequences)."""
    reference, exported = fairseq_model(state, dictionary), load_exported(out_dir)
    length = min(length, reference.max_positions())
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (2, length), generator=generator)
    with torch.no_grad():
        return (reference(tokens)[0] - exported(tokens).logits).abs().max().item()


def readable(folder: str) -> None:
    """mkdtemp (and the weights writer) make owner-only files: give them the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


# ----------------------------------------------------------------------------- the output folder
def is_earlier_export(folder: str) -> bool:
    """Whether `folder` holds an export of ours (its marker, or our model_type in config.json)."""
    if os.path.isfile(os.path.join(folder, MARKER)):
        return True
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type") == "fairseq_smlp"
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out_dir: str, checkpoint: str, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an --out that the export must not replace."""
    if os.path.islink(out_dir):
        raise ExportError(f"--out {out_dir} is a symbolic link: give the folder itself (or a new path)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir} is a file, not a folder: choose a new path")
    if not os.path.exists(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty (pass --overwrite to replace an earlier export)")
    target = os.path.realpath(out_dir)
    protected = {os.path.realpath(os.getcwd()): "the current directory"}
    folder = os.path.dirname(os.path.realpath(checkpoint))
    while True:
        protected.setdefault(folder, "the checkpoint's folder or one above it")
        if os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    if target in protected:
        raise ExportError(f"--out {out_dir} is {protected[target]}: --overwrite never replaces it; choose a new --out")
    if not is_earlier_export(target):
        raise ExportError(f"--out {out_dir} holds files that are not an earlier export (no {MARKER}): "
                          "--overwrite only replaces an export; choose another --out or remove the folder yourself")


def write_marker(folder: str, checkpoint: str) -> None:
    """Mark `folder` as an export, so that a later --overwrite may replace it."""
    info = {"exported_by": "fairseq_smlp.export_hf", "checkpoint": os.path.abspath(checkpoint),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(info, f, indent=1)


def move_into_place(new: str, out_dir: str) -> None:
    """Put the finished folder `new` at `out_dir`: an earlier export is renamed aside first and
    removed only once the new one is in place (restored if that fails)."""
    if not os.path.exists(out_dir) or not os.listdir(out_dir):
        os.replace(new, out_dir)  # nothing there, or an empty folder
        return
    aside = tempfile.mkdtemp(prefix=".export_hf_old_", dir=os.path.dirname(os.path.abspath(out_dir)))
    old = os.path.join(aside, "old")
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def export(
    checkpoint: str, out_dir: str, dict_path: Optional[str] = None, spm_model: Optional[str] = None,
    gpt2_files: Optional[Tuple[str, str]] = None, verify: bool = True, overwrite: bool = False,
) -> dict:
    """Write the transformers folder `out_dir`; returns a summary (family, tokenizer, max logit difference)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, nothing downloads
    check_out_dir(out_dir, checkpoint, overwrite)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with single_worker_checkpoint(checkpoint, work_dir=parent) as path:  # a merge beside --out, not in /tmp
        state = load_checkpoint(path)
    plan = plan_export(state)
    dictionary = load_dictionary(dict_path or default_dict(state))
    vocab = state["model"]["decoder.embed_tokens.weight"].size(0)
    if len(dictionary) != vocab:
        raise ExportError(
            f"--dict {dict_path or default_dict(state)} has {len(dictionary)} symbols, the model {vocab}: "
            "pass the dict.txt it was trained with"
        )
    check_dictionary(state, dictionary, dict_path or default_dict(state))
    if spm_model is None and gpt2_files is None and not looks_like_gpt2(dictionary):
        spm_model = default_spm_model(state)
    model = build_hf_model(state, plan)

    tmp = tempfile.mkdtemp(prefix=".export_hf_", dir=parent)  # the folder appears complete or not at all
    try:
        if not plan.native:  # save_pretrained then copies the modelling code and writes config.auto_map
            type(plan.config).register_for_auto_class()
            plan.model_class.register_for_auto_class("AutoModelForCausalLM")
        model.save_pretrained(tmp)
        kind = save_tokenizer(dictionary, tmp, spm_model, gpt2_files)
        difference = max_logit_difference(state, dictionary, tmp) if verify else None
        if difference is not None and not difference <= VERIFY_TOLERANCE:
            raise ExportError(
                f"the exported model's logits differ from fairseq's by {difference:.3g} (> {VERIFY_TOLERANCE}); "
                "nothing written"
            )
        write_marker(tmp, checkpoint)
        readable(tmp)
        move_into_place(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return dict(
        family=type(model).__name__, blocks=getattr(plan.config, "blocks", None), tokenizer=kind,
        parameters=sum(p.numel() for p in model.parameters()), max_logit_difference=difference,
        spm_model=spm_model if kind != GPT2 else None,
    )
