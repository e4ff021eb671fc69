"""Dataset preparation: raw per-domain atomic files -> the files of data.md."""
