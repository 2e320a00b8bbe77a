"""torch's fused AdamW for CPU runs: fairseq's CPU Adam is a Python loop of about ten
whole-tensor passes per parameter (benchmarks/results/optimizer_ab.md)."""
import torch


class CpuFusedAdamW(torch.optim.AdamW):
    """torch's fused AdamW (one kernel per tensor), what fairseq's Adam is on the CPU.
    fairseq's is AdamW too (decoupled weight decay); the one difference is where eps enters:
    torch adds it to the bias-corrected sqrt(v), as fairseq's own GPU FusedAdam does, fairseq's
    CPU Adam before the correction (it matters only for gradients near eps, in the first steps)."""

    supports_flat_params = True  # FP16Optimizer (the CPU fp16 rehearsal) hands it one flat fp32 tensor

    def __init__(self, param_groups, lr, betas, eps, weight_decay):
        super().__init__(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the state of fairseq's Adam (an older checkpoint) says nothing of it
            group["fused"] = True


def replace_cpu_adam(optimizer, cfg, optimizer_config: dict):
    """The torch optimizer fairseq's FairseqAdam should hold: a CpuFusedAdamW over the same
    parameter groups in place of fairseq's own Adam when every parameter is fp32 on the CPU,
    else `optimizer` itself (--use-old-adam, a TPU, fp16 weights or a GPU: fairseq's choice)."""
    from fairseq.optim.adam import Adam

    groups = optimizer.param_groups
    tensors = [p for g in groups for p in g["params"]]
    plain_adam = type(optimizer) is Adam and not getattr(cfg, "use_old_adam", False)
    if (plain_adam and not getattr(cfg, "tpu", False)
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tensors)):
        return CpuFusedAdamW([{"params": g["params"]} for g in groups], **optimizer_config)
    return optimizer
