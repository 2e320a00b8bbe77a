"""sMLP's layers: the gMLP and sparse blocks, the spatial gating unit (dense or sMoE), causal
token mixing. Shapes are named as in docs/model.md, "Shapes and names" (B, T, H, C, E, ...)."""
