"""The data layer: contract files, the domain vocabulary, splits and batches."""
from data.batches import SequenceBatch, SequenceLoader, pad_rows
from data.dataset import PreparedDataset, split_names
from data.domains import DomainRanges, checked_item_range
from data.files import DataError, SequenceRows, read_inter
from data.paths import project_path

__all__ = [
    "DataError",
    "DomainRanges",
    "PreparedDataset",
    "SequenceBatch",
    "SequenceLoader",
    "SequenceRows",
    "pad_rows",
    "project_path",
    "read_inter",
    "split_names",
]
