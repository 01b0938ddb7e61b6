"""Views: what `distml top`, `distml lineage` and the CLI's tables show, over the owners' reads.

No SQL here: each view calls the reads of the package that owns the tables (`workflow.store`,
`train.store`, `models.registry`, `lineage.store`, `scheduling.admission`, `pipelines.watches`).
"""
