"""Foundations every layer may import: every user-facing error (`core.errors`), the configuration
schema checker (`core.schema`) and the process group of a torchrun launch with its devices
(`core.distributed`). Nothing here imports the project above it; the orchestration that composes
the stages lives in `pipeline/`."""
