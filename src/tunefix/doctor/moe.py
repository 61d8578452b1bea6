"""Mixture-of-experts LoRA targets: routers adapted, experts left without adapters.

Both read ``model.lora.moe_plan``: PEFT's own matching on a meta-device copy of the model, for
the run's targets (``Probe.lora_targets``; None is tunefix's default, every linear projection).
Measured with PEFT 0.21 / transformers 5.24: PEFT's "all-linear" adapts Qwen3-MoE's router
(``mlp.gate``) and leaves the experts of gpt-oss and Qwen3.5-MoE without adapters; tunefix's
default targets exclude routers, and its LoRA names the stacked expert weights where PEFT does
not map them (``model.lora.add_lora``).
"""

from __future__ import annotations

from tunefix.doctor.probe import Probe
from tunefix.doctor.report import Finding


def _targets(p: Probe) -> list[str] | str:
    from tunefix.model.lora import ALL_LINEAR

    return p.lora_targets if p.lora_targets is not None else list(ALL_LINEAR)


def _plan(p: Probe):
    from tunefix.model.lora import is_moe, moe_plan

    if not is_moe(p.s.config) or not p.s.model_type:
        return None
    cached = getattr(p, "_moe_plan", None)
    if cached is None:
        try:
            cached = p._moe_plan = moe_plan(p.s.config, _targets(p))  # type: ignore[attr-defined]
        except ValueError:  # PEFT: the targets match no module at all; LoRA set-up says so itself
            return None
    return cached


def _asks_all_linear(targets: list[str] | str) -> bool:
    from tunefix.model.lora import ALL_LINEAR

    if isinstance(targets, str):
        return targets.lower() == "all-linear"
    return set(ALL_LINEAR) <= set(targets)


def moe_router_targets(p: Probe) -> Finding | None:
    plan = _plan(p)
    if plan is None or not plan.routers_adapted:
        return None
    return Finding("moe-router-targeted", "warning",
                   f"LoRA would adapt {len(plan.routers_adapted)} MoE router(s): training then changes which "
                   "experts each token goes to, and a small adapter there can collapse the routing",
                   {"routers": plan.routers_adapted, "targets": _targets(p)},
                   fix="leave the router ('gate', 'router') out of the targets: tunefix's default targets do; "
                       "PEFT's 'all-linear' does not")


def moe_experts_unadapted(p: Probe) -> Finding | None:
    plan = _plan(p)
    targets = _targets(p)
    if plan is None or not plan.experts_unadapted or not _asks_all_linear(targets):
        return None
    return Finding("moe-experts-unadapted", "warning",
                   f"all linear layers were asked for, but PEFT gives the experts of {len(plan.experts_unadapted)} "
                   "MoE block(s) no adapter (it does not map the dense names onto this family's fused experts): "
                   "most of the model's parameters would not be trained",
                   {"experts": plan.experts_unadapted, "expert_parameters": plan.expert_parameters},
                   fix=f"tunefix's LoRA adds them as PEFT target_parameters {plan.expert_parameters}; with PEFT "
                       "directly, pass those target_parameters")
