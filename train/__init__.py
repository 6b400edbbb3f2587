"""The bundled QLoRA/LoRA LLaVA trainer. Run as `python -m train` (see train/README.md).

`vramplan/` never imports this package, and it imports nothing of vramplan but `vramplan.contract` (the shared
exit codes, plan loader, recipe defaults, chat templates and dataset rules); see docs/contracts.md.
"""
