"""distml: the patterns of large-scale machine learning as one working Python system.

Data ingestion, distributed training, serving, workflows and operations share one
workspace (`distml.workspace.Workspace`) that holds the metadata and artifact stores.
"""

__version__ = "0.1.0"
