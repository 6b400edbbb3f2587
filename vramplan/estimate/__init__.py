"""vramplan.estimate: see docs/architecture.md."""
