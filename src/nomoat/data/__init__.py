"""Datasets: read files in many formats, tokenize with chat-template masking, pack, batch, summarize.

The first stage of the data flow; `train` and `eval` consume what it yields. The training side runs
`load_dataset` -> `split_validation` -> `tokenize_dataset` (or `tokenize_example` per example) -> `pack` or
`length_grouped_batches` -> `BatchStream` (collated batches, resumable) -> `summarize`.
"""

from nomoat.data.formats import (
    FORMATS,
    Conversation,
    DataError,
    Example,
    NoTrainableTokensError,
    Preference,
    Source,
    Text,
    detect_format,
    register_format,
)
from nomoat.data.loading import Dataset, load_dataset
from nomoat.data.packing import BatchStream, Row, collate, length_grouped_batches, pack, split_validation
from nomoat.data.render import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    TRAIN_ON,
    Tokenized,
    assert_has_labels,
    tokenize_dataset,
    tokenize_example,
    tokenize_preference,
)
from nomoat.data.summary import DataSummary, summarize

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "FORMATS", "IGNORE_INDEX", "TRAIN_ON", "BatchStream", "Conversation", "DataError",
    "DataSummary", "Dataset", "Example", "NoTrainableTokensError", "Preference", "Row", "Source", "Text", "Tokenized",
    "assert_has_labels", "collate", "detect_format", "length_grouped_batches", "load_dataset", "pack",
    "register_format", "split_validation", "summarize", "tokenize_dataset", "tokenize_example", "tokenize_preference",
]
