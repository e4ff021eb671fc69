"""The orchestration above the models and the trainer: composing and checking each stage's configuration,
which stage reads which key, the artifact store, the run sequence and the run records."""
