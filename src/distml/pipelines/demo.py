"""What `distml demo` shows once the pipeline serves its model: real test images, the answers, the truth.

Sends one V2 request with a batch of test images (as a client would send them) to the service
and lays the predicted classes and their confidence next to the true labels.
"""

from __future__ import annotations

from typing import Any

import httpx
from rich.table import Table

from distml.core.errors import DistmlError
from distml.core.refs import ModelRef
from distml.pipelines.end_to_end import client_images, v2_request


def answer_table(ws: Any, url: str, model: str, dataset: str, data_dir: str | None, count: int) -> Table:
    name = ModelRef.parse(model).name
    images, labels, classes = client_images(ws, dataset, data_dir, count)
    response = httpx.post(f"{url}/v2/models/{name}/infer", json=v2_request(images), timeout=60)
    if response.status_code != 200:
        raise DistmlError(f"the service answered {response.status_code}: {response.text[:300]}")
    body = response.json()
    outputs = {o["name"]: o for o in body["outputs"]}
    predicted = outputs["label"]["data"]
    probabilities = outputs["probabilities"]["data"]
    width = len(classes)
    table = Table(title=f"{name} version {body.get('model_version')} at {url}")
    for column in ("image", "true label", "answer", "confidence", ""):
        table.add_column(column)
    right = 0
    for i, (truth, guess) in enumerate(zip(labels, predicted, strict=True)):
        confidence = probabilities[i * width + guess]
        ok = truth == guess
        right += ok
        table.add_row(str(i), classes[truth], classes[guess], f"{confidence:.2f}", "✓" if ok else "✗")
    table.caption = f"{right}/{len(labels)} right"
    return table
