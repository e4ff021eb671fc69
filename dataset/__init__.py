"""Dataset preparation: raw per-domain atomic files -> the files of the data contract (docs/data.md)."""
