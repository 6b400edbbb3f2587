"""vramplan: plan, check and run QLoRA/LoRA fine-tuning of LLaVA-style models.

Importing this package is cheap and never imports torch, transformers or deepspeed.
"""

__version__ = "0.1.0"
