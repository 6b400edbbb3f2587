"""vramplan.run: see docs/architecture.md."""
