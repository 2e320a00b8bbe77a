"""--moe-compile: torch.compile for the MoE hot paths (optional, off by default).

Compiled: each feed-forward MoE layer whole (FeedForwardMoE.forward: router, static-shape
dispatch, experts, combine; with expert parallelism only the experts' batched forward) and the
partial-prediction sMoE's routed mixing (channel gather, causal mixing, router weights, scatter
back). Data-dependent steps inside a layer (a balanced assignment's sweeps, capacity counts)
become graph breaks: dynamo compiles the pieces between them.
Numbers equal eager to float rounding (tests/unit/test_moe_speed_paths.py). On a CPU, inductor
needs a C++ compiler: without one (or if compiling fails) the model runs eager, with one
log line. Measured gains and costs: README, Benchmarks.
"""
import logging
import shutil

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)
_WARNED = {"fallback": False}


def compiler_available() -> bool:
    """torch.compile exists and (for CPU code) a C++ compiler is on PATH."""
    if not hasattr(torch, "compile"):
        return False
    try:
        from torch._inductor import cpp_builder

        return bool(cpp_builder.get_cpp_compiler())
    except Exception:  # inductor could not find or run a compiler
        return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def _fall_back(what: str, error: Exception) -> None:
    if not _WARNED["fallback"]:
        _WARNED["fallback"] = True
        logger.warning(
            f"--moe-compile: torch.compile cannot run here ({what}: {type(error).__name__}: {error}); running eager"
        )


class CompiledOrEager:
    """fn compiled on first call; eager from then on if compiling fails."""

    def __init__(self, fn, name: str):
        self.eager, self.name = fn, name
        self.compiled = torch.compile(fn)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # a missing or failing compiler: never twice
                _fall_back(self.name, error)
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_moe(model: nn.Module) -> int:
    """Compile the hot paths of every module in `model` that opts in with a
    `compile_targets()` method naming them (--moe-compile). Returns how many functions were
    wrapped (0 where the compiler is missing: then eager, one log line)."""
    if not compiler_available():
        _fall_back("setup", RuntimeError("no torch.compile or no C++ compiler on PATH"))
        return 0
    wrapped, compiled_modules = 0, []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in compiled_modules):
            continue  # inside a module compiled whole: its graph already holds this one
        targets = getattr(module, "compile_targets", lambda: [])()
        for method in targets:
            setattr(module, method, CompiledOrEager(getattr(module, method), f"{name}.{method}"))
            wrapped += 1
        if "forward" in targets:
            compiled_modules.append(name)
    return wrapped
