"""Data ingestion: sources, batching, sharding, caching and resumable loader state.

`Loader(source, batch_size=..., shard=(rank, world_size), cache=...)` is the entry point;
sources live in `distml.data.sources`, named data sets in `distml.data.datasets`.
"""

from distml.data.loader import Loader
from distml.data.preprocess import Compose, DecodeBytes, Function, Normalize, Reshape, Resize, Step
from distml.data.sources import ArraySource, CsvSource, IdxSource, NpzSource, ParquetSource, Source, SqlSource

__all__ = [
    "ArraySource",
    "Compose",
    "CsvSource",
    "DecodeBytes",
    "Function",
    "IdxSource",
    "Loader",
    "Normalize",
    "NpzSource",
    "ParquetSource",
    "Reshape",
    "Resize",
    "Source",
    "SqlSource",
    "Step",
]
