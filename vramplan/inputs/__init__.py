"""vramplan.inputs: see docs/architecture.md."""
