"""Named architectures: each family declares a table {size: defaults}, registered here.

    register_archs("smlp_lm", "smlp_lm", {"tiny": {...}, "base": {...}})  ->  --arch smlp_lm_tiny, ...

An arch sets its defaults only where the command line left a value unset (fairseq's
convention), then runs `finish` (e.g. fairseq's transformer_lm defaults for the rest).
"""
from typing import Callable, Dict, Optional

from fairseq.models import register_model_architecture


def set_defaults(args, **defaults) -> None:
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def register_archs(model: str, family: str, sizes: Dict[str, dict], describe: Callable[[dict], str],
                   finish: Optional[Callable] = None) -> None:
    """Register `{family}_{size}` on `model` for every row of `sizes`."""
    for size, defaults in sizes.items():
        def arch(args, defaults=defaults):
            set_defaults(args, **defaults)
            if finish is not None:
                finish(args)

        arch.__name__ = f"{family}_{size}"
        arch.__doc__ = describe(defaults)
        register_model_architecture(model, arch.__name__)(arch)
