from . import moe_cross_entropy  # noqa: F401
