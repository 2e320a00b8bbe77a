"""Export a checkpoint to a transformers folder, then check that transformers reproduces fairseq.

    export(CKPT, OUT)  ->  OUT/config.json, model.safetensors, generation_config.json,
                           the tokenizer files, and (sMLP, gMLP, MoE) the modelling code
"""
import os
import shutil
import tempfile
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ..models import vocabulary
from .convert import ExportError, build_hf_model, skip_broken_torchaudio, load_checkpoint, plan_export, single_worker_checkpoint
from .tokenizer import GPT2, load_dictionary, looks_like_gpt2, save_tokenizer

VERIFY_TOLERANCE = 1e-4  # max |logit difference| accepted in fp32 (measured differences are ~1e-6)


def data_dir(state) -> Optional[str]:
    data = state["cfg"]["task"].get("data") if "task" in state["cfg"] else None
    return str(data).split(os.pathsep)[0] if data else None


def default_dict(state) -> str:
    data = data_dir(state)
    path = os.path.join(data, "dict.txt") if data else None
    if not path or not os.path.isfile(path):
        raise ExportError(f"the training dictionary {path or '(no data path in the checkpoint)'} is not there: pass --dict DATA_BIN/dict.txt")
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
        detail = vocabulary.first_differences(saved["symbols"], mine["symbols"]) if saved.get("symbols") else "other content"
        raise ExportError(f"--dict {dict_file} is not the dictionary the checkpoint was trained with ({detail}): pass the training dict.txt")


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
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (reference(tokens)[0] - exported(tokens).logits).abs().max().item()


def readable(folder: str) -> None:
    """mkdtemp (and the weights writer) make owner-only files: give them the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def export(
    checkpoint: str, out_dir: str, dict_path: Optional[str] = None, spm_model: Optional[str] = None,
    gpt2_files: Optional[Tuple[str, str]] = None, verify: bool = True, overwrite: bool = False,
) -> dict:
    """Write the transformers folder `out_dir`; returns a summary (family, tokenizer, max logit difference)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, nothing downloads
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty (pass --overwrite to replace it)")
    with single_worker_checkpoint(checkpoint) as path:
        state = load_checkpoint(path)
    plan = plan_export(state)
    dictionary = load_dictionary(dict_path or default_dict(state))
    vocab = state["model"]["decoder.embed_tokens.weight"].size(0)
    if len(dictionary) != vocab:
        raise ExportError(f"--dict {dict_path or default_dict(state)} has {len(dictionary)} symbols, the model {vocab}: pass the dict.txt it was trained with")
    check_dictionary(state, dictionary, dict_path or default_dict(state))
    if spm_model is None and gpt2_files is None and not looks_like_gpt2(dictionary):
        spm_model = default_spm_model(state)
    model = build_hf_model(state, plan)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export_hf_", dir=parent)  # the folder appears complete or not at all
    try:
        if not plan.native:  # save_pretrained then copies the modelling code and writes config.auto_map
            type(plan.config).register_for_auto_class()
            plan.model_class.register_for_auto_class("AutoModelForCausalLM")
        model.save_pretrained(tmp)
        kind = save_tokenizer(dictionary, tmp, spm_model, gpt2_files)
        difference = max_logit_difference(state, dictionary, tmp) if verify else None
        if difference is not None and not difference <= VERIFY_TOLERANCE:
            raise ExportError(f"the exported model's logits differ from fairseq's by {difference:.3g} (> {VERIFY_TOLERANCE}); nothing written")
        readable(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return dict(
        family=type(model).__name__, blocks=getattr(plan.config, "blocks", None), tokenizer=kind,
        parameters=sum(p.numel() for p in model.parameters()), max_logit_difference=difference,
        spm_model=spm_model if kind != GPT2 else None,
    )
