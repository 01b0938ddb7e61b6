"""Workflows: pipelines of steps as plain Python, memoized, retried, durable and resumable.

```python
from distml.workflow import step, best_of, Resources

@step(memoize=True, max_age=3600)
def ingest(dataset: str) -> dict: ...

@step(resources=Resources(cpus=1, workers=2), retries=2)
def train(model: str, data: dict) -> dict: ...

def pipeline(dataset: str = "digits"):
    data = ingest(dataset)
    models = train.map(["cnn", "dropout"], data=data)   # fan-out
    return pick(models)                                  # fan-in
```
Run it with `distml run path/to/file.py:pipeline --param dataset=digits`.
"""

from distml.scheduling.core import Resources
from distml.workflow.dag import Node, Step, best_of, step
from distml.workflow.executor import current
from distml.workflow.values import Artifact

__all__ = ["Artifact", "Node", "Resources", "Step", "best_of", "current", "step"]
