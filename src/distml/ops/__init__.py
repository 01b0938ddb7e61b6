"""Operations: scheduling, metadata and lineage, metrics."""
