"""Mixture-of-experts machinery shared by sMLP and the Transformer-MoE baselines.

    router.py               every router (Base, Top-1, Top-2, Hash, the prefix channel router), fp32
    balanced_assignment.py  the balanced-assignment solvers (torch price search; fairseq's libbase)
    experts.py              E expert FFNs with stacked weights, batched
    dispatch.py             group tokens by expert, run the experts, combine (one process or sharded)
    feed_forward_moe.py     MoEArgs -> FeedForwardMoE (a router and its experts)
    base_experts.py         a Base layer with all E experts in one process (Base Layers' baseline)
    sharding.py             slice a stacked-expert module to one rank's experts (expert parallelism)

Shapes are named as in docs/model.md, "Shapes and names" (N tokens, H, F, E experts, K slots, ...).
"""
