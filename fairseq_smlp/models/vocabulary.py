"""Dictionary identity: a checkpoint remembers the dictionary it was trained with.

A model evaluated on a data-bin whose dict.txt has other words but the same size loads
without complaint and prints a plausible, wrong perplexity (the ids mean other words). So
every checkpoint carries a fingerprint of its dictionary (the hash of its symbols, and the
symbols, to name the first entries that differ), and loading a checkpoint into a model
built on another dictionary is an error. fairseq_patches.py wires it in:

    Trainer.state_dict          record(state, task): state["dictionary"] = fingerprint(task dictionary)
    load_checkpoint_to_cpu      state["model"] becomes a ModelState carrying that record
    FairseqLanguageModel.load_state_dict   check_vocabulary(model, state_dict) first

Checkpoints saved before this have no record: only their sizes are compared.
"""
import hashlib
from typing import List, Optional

from ..errors import UserError


def fingerprint(dictionary) -> dict:
    """{"size", "sha256", "symbols"} of a fairseq Dictionary (specials and padding included)."""
    symbols = list(dictionary.symbols)
    digest = hashlib.sha256("\n".join(symbols).encode("utf-8")).hexdigest()
    return {"size": len(symbols), "sha256": digest, "symbols": symbols}


def record(state: dict, task) -> None:
    """Store the fingerprint of the task's dictionary in a checkpoint's state (Trainer.state_dict)."""
    dictionary = getattr(task, "target_dictionary", None)
    if dictionary is not None:
        state["dictionary"] = fingerprint(dictionary)


class ModelState(dict):
    """A checkpoint's model state dict that also knows the checkpoint's dictionary record."""

    dictionary: Optional[dict] = None


def attach(state: dict) -> dict:
    """Give state["model"] the checkpoint's dictionary record (for check_vocabulary)."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and state.get("dictionary"):
        model = ModelState(state["model"])
        model.dictionary = state["dictionary"]
        state["model"] = model
    return state


def first_differences(saved: List[str], mine: List[str], limit: int = 3) -> str:
    """'969 of 988 entries differ, first: #4 'the' vs 'a', ...' (checkpoint vs here)."""
    pairs = [(i, a, b) for i, (a, b) in enumerate(zip(saved, mine)) if a != b]
    pairs += [(i, saved[i] if i < len(saved) else None, mine[i] if i < len(mine) else None)
              for i in range(min(len(saved), len(mine)), max(len(saved), len(mine)))]
    shown = ", ".join(f"#{i} {a!r} vs {b!r}" for i, a, b in pairs[:limit])
    return f"{len(pairs)} of {max(len(saved), len(mine))} entries differ, first (checkpoint vs here): {shown}"


class DictionaryMismatchError(UserError, ValueError):
    """A checkpoint loaded into a model built on another dictionary."""


def _mismatch(dict_file: str, detail: str) -> DictionaryMismatchError:
    return DictionaryMismatchError(
        f"dictionary mismatch: the checkpoint was trained with another dictionary than {dict_file} ({detail}). "
        "Use the data-bin the model was trained on, or binarize your text with that dictionary "
        "(fairseq-preprocess --only-source --srcdict TRAINED/dict.txt)"
    )


def check_vocabulary(model, state_dict) -> None:
    """Raise if `state_dict` (a checkpoint's model state) was trained with another dictionary
    than the one `model` was built with: by content where the checkpoint has a record, else
    by the embedding's size."""
    dict_file = getattr(model, "dictionary_file", None) or "the data-bin's dict.txt"
    decoder = getattr(model, "decoder", None)
    dictionary = getattr(decoder, "dictionary", None)
    saved = getattr(state_dict, "dictionary", None)
    if saved is not None and dictionary is not None:
        mine = fingerprint(dictionary)
        if saved["sha256"] != mine["sha256"]:
            if saved.get("symbols"):
                detail = first_differences(saved["symbols"], mine["symbols"])
            else:
                detail = f"{saved['size']} symbols in the checkpoint, {mine['size']} here, other content"
            raise _mismatch(dict_file, detail)
        return
    embed = getattr(decoder, "embed_tokens", None)
    saved_embed = state_dict.get("decoder.embed_tokens.weight")
    if saved_embed is not None and embed is not None and saved_embed.size(0) != embed.weight.size(0):
        raise _mismatch(
            dict_file, f"the checkpoint's has {saved_embed.size(0)} symbols, {dict_file} has {embed.weight.size(0)}"
        )
