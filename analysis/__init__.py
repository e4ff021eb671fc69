"""Analyses of the pipeline's outputs: Table 3 ablations, figures and diagnostics."""
