"""Lineage: where every model came from and where it went, recorded as ML Metadata.

`store` (data set snapshots and the artifact/execution/event graph, migrations 1 and 7) and
`record` (the functions producers call). `distml.views.lineage` walks the graph and draws it.
"""
