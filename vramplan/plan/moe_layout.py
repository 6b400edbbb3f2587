"""Which transformers layout a mixture-of-experts model runs with (families/mixtral.py `fused_experts`).

transformers 5 stores a MoE layer's experts as fused 3-D parameters (models/mixtral/modeling_mixtral.py
MixtralExperts; checkpoints' per-expert w1/w2/w3 are merged at load by transformers conversion_mapping.py), which
bitsandbytes does not quantize and PEFT targets through `target_parameters`; transformers 4 kept one nn.Linear
per expert (4-bit under QLoRA, adapted per expert). --transformers-version plans for another machine's release,
like --bnb-version; else the installed one (metadata only), else the pinned one.
"""

from __future__ import annotations

from dataclasses import replace

PINNED_TRANSFORMERS = "5.23.0"  # constraints.txt
FUSED_SINCE = (5, 0, 0)


def resolve_expert_layout(o, model, ctx):
    """The model with its MoE text spec's `fused_experts` set from the transformers release; others unchanged."""
    from vramplan.plan.request import release, version_tuple

    t = model.text
    if not hasattr(t, "fused_experts"):
        return model
    ver, where = release(o.transformers_version, "--transformers-version", "transformers", PINNED_TRANSFORMERS)
    fused = version_tuple(ver) >= FUSED_SINCE
    ctx.assumptions.append(
        f"transformers {ver} ({where}): the {t.num_experts} experts per layer are "
        + ("fused 3-D parameters: bitsandbytes leaves them 16-bit, LoRA reaches them only through PEFT's "
           "parameter targets" if fused else "one nn.Linear each: quantized and adapted per expert")
        + f"; {t.experts_per_token} of them compute per token")
    return replace(model, text=replace(t, fused_experts=fused))
