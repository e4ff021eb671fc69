"""The pipeline around the models: configuration and its schema, the artifact store, run outputs."""
