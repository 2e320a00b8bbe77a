"""Loading a checkpoint never runs code from it.

Every checkpoint load of the plugin, and fairseq's own (fairseq_patches.py gives fairseq's
checkpoint_utils a `torch` whose `load` is this one), goes through `load_checkpoint_file`:
torch's weights-only unpickler, memory-mapped where the file allows, with the short list of
classes that older fairseq formats hold (`args` as argparse.Namespace, `cfg` as an omegaconf
DictConfig). The checkpoints fairseq 0.12 and this plugin write need none of them. A file
that needs anything else is refused by name; a user who trusts such a file sets
SMLP_TRUST_CHECKPOINTS=1 (read at each load; the plugin never sets it).
"""
import argparse
import collections
import os
import pickle
import re
import types
import typing
import zipfile

import torch

from ..errors import UserError
from .file_safety import intact, load_or_explain

TRUST_VARIABLE = "SMLP_TRUST_CHECKPOINTS"


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A checkpoint whose pickle needs a global outside the allow-list."""


def allowed_globals() -> list:
    """What old fairseq checkpoints need (measured with get_unsafe_globals_in_checkpoint on
    files holding `args` as a Namespace and `cfg` as a DictConfig); nothing that runs code."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [argparse.Namespace, DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode,
            typing.Any, collections.defaultdict, int, dict, list]


def trusted() -> bool:
    """The user's explicit opt-out for a file they trust (never set by the plugin)."""
    return os.environ.get(TRUST_VARIABLE) == "1"


def _name(source) -> str:
    return str(getattr(source, "name", source))


def _path_of(source):
    """A filesystem path for `source` (a path, or a file object opened on one), else None."""
    name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) and os.path.isfile(name) else None


def _global_name(g) -> str:
    return f"{g.__module__}.{getattr(g, '__qualname__', getattr(g, '_name', g))}"


def refused_globals(source, error: Exception, extra=()) -> list:
    """The globals a refused pickle needs beyond the allow-list, read without unpickling."""
    allowed = {_global_name(g) for g in [*allowed_globals(), *extra]} | {"typing.Any"}
    names = []
    path = _path_of(source)
    if path is not None and zipfile.is_zipfile(path):
        try:
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
        except Exception:  # a damaged archive: fall back to the unpickler's message
            names = []
    return names or re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def refusal(source, error: Exception, extra=()) -> UnsafeCheckpointError:
    """The one-line error for a pickle the weights-only unpickler refused."""
    names = refused_globals(source, error, extra)
    reason = [line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line][:1]
    what = f"global {', '.join(names)}" if names else f"more than weights ({''.join(reason) or 'refused'})"
    return UnsafeCheckpointError(
        f"checkpoint {_name(source)} needs {what}, which is not allowed when loading safely "
        f"(a checkpoint's pickle can run code); if you trust this file, set {TRUST_VARIABLE}=1 and rerun"
    )


def _load(source, map_location, extra_globals, **kwargs):
    """torch.load, weights only unless the user trusts the file; the allow-list either way
    (TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 set by the user still loads old formats)."""
    with torch.serialization.safe_globals([*allowed_globals(), *extra_globals]):
        if trusted():
            return torch.load(source, map_location=map_location, weights_only=False, **kwargs)
        try:
            return torch.load(source, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            damaged = isinstance(source, str) and not intact(source)
            if "Weights only load failed" not in str(e) or damaged:
                raise  # a damaged file: load_or_explain names it
            raise refusal(source, e, extra_globals) from None


def load_checkpoint_file(source, map_location="cpu", extra_globals=(), **kwargs):
    """torch.load(source) that never runs code from the file; `source` is a path or a file
    object. mmap where the file is a zip archive (the tensors stay on disk until used);
    a damaged file is named as such, a refused one with the global it needs."""
    path = _path_of(source)
    if path is None:
        return _load(source, map_location, extra_globals, **kwargs)
    if zipfile.is_zipfile(path):
        kwargs.setdefault("mmap", True)
    return load_or_explain(_load, path, map_location, extra_globals, **kwargs)


class SafeTorch(types.ModuleType):
    """torch as a fairseq module sees it (`module.torch = SafeTorch()`), whose `load` is the
    safe one: fairseq's own torch.load calls take the same path as the plugin's."""

    def __init__(self, extra_globals=()):
        super().__init__("torch")
        self._extra_globals = list(extra_globals)

    def __getattr__(self, name):
        return getattr(torch, name)

    def load(self, f, map_location=None, **kwargs):
        kwargs.pop("weights_only", None)  # always weights only (SMLP_TRUST_CHECKPOINTS aside)
        return load_checkpoint_file(f, map_location=map_location, extra_globals=self._extra_globals, **kwargs)
