"""The bundled QLoRA/LoRA LLaVA trainer. Run as `python -m train` (see train/README.md).

`vramplan/` never imports this package; they meet through plan.json (docs/contracts.md).
"""
