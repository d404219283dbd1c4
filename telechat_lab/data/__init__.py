"""Data pipeline: dataset_info.json registry -> record formats -> TeleChat2 chat encoding ->
tokenised, cached, mixed and split datasets -> padded or packed batches."""

from telechat_lab.config import DataConfig
from telechat_lab.errors import DataError

from .dataset import EncodedDataset
from .encoder import ChatEncoder
from .formats import Conversation, to_conversation
from .pipeline import build_datasets, format_report
from .registry import DatasetSpec, load_dataset_info

__all__ = [
    "ChatEncoder",
    "Conversation",
    "DataConfig",
    "DataError",
    "DatasetSpec",
    "EncodedDataset",
    "build_datasets",
    "format_report",
    "load_dataset_info",
    "to_conversation",
]
