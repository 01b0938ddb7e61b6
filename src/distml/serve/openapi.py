"""The JSON schemas of the serving bodies, for the API docs (/docs) only.

The wire formats are parsed and written by hand in `protocol.py` (faster, and with errors that
name the field); these pydantic models describe the same bodies to OpenAPI and are never used
to parse a request. The admin bodies are the other way round: `admin_api` holds the models that
parse them, and the docs show those.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from distml.models.datatypes import DATATYPES


class Doc(pydantic.BaseModel):
    """A body as the API docs show it: fields beyond those listed are allowed."""

    model_config = pydantic.ConfigDict(extra="allow")


class TensorBody(Doc):
    name: str
    shape: list[int]
    datatype: Literal[tuple(DATATYPES)]  # type: ignore[valid-type]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = pydantic.Field(None, description="row-major, flat or nested as the shape")


class RequestedOutputBody(Doc):
    name: str
    parameters: dict[str, Any] | None = pydantic.Field(None, examples=[{"binary_data": True}])


class InferRequestBody(Doc):
    """Open Inference Protocol (V2) infer request; raw tensors may follow the JSON (binary extension)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorBody]
    outputs: list[RequestedOutputBody] | None = None


class InferResponseBody(Doc):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[TensorBody]


class ErrorBody(Doc):
    error: str


class LiveBody(Doc):
    live: bool


class ReadyBody(Doc):
    ready: bool


class ModelReadyBody(Doc):
    name: str
    version: str | None = None
    ready: bool


class ServerMetadataBody(Doc):
    name: str
    version: str
    extensions: list[str]


class TensorMetadataBody(Doc):
    name: str
    datatype: str
    shape: list[int] = pydantic.Field(description="-1: any size")


class ModelMetadataBody(Doc):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadataBody]
    outputs: list[TensorMetadataBody]
    parameters: dict[str, Any] | None = None


class JobBody(Doc):
    id: str
    status: str
    model: str | None = None
    model_version: str | int | None = None


class V1ModelBody(Doc):
    name: str
    ready: bool


class PredictRequestBody(Doc):
    """V1 `:predict`: one instance per image, a nested list of pixels or {"image_bytes": {"b64": ...}}."""

    instances: list[Any]


class PredictResponseBody(Doc):
    predictions: list[Any]
