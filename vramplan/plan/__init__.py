"""vramplan.plan: see docs/architecture.md."""
