"""The request bodies of the gateway's admin API, one pydantic model each, shared by server and client.

The gateway parses every admin body with its model here (`parse_body`) and `GatewayAdmin`, the one
client, builds its bodies with the same models (`parse_body`, then `to_json`), so the two cannot
disagree. A model version is one type, `ModelVersion`: a positive integer, sent as a string ("3");
3 and, on a route under a model (`parse_body(..., model=NAME)`), "NAME:3" are accepted too. A bad
body is one 400 `{"error": "invalid <what>: <field>: <problem> (got <value>); expected <shape>"}`,
the shape every other bad request to the gateway gets (`http.install_error_handlers`).

Bodies, named as the doc models of `openapi.py` (/docs shows them under these names):
`ScaleRequestBody` (POST /admin/replicas/scale), `RollRequestBody` (POST /admin/replicas/roll),
`TrafficRequestBody` (POST /admin/models/{model}/traffic), `PromoteRequestBody` (.../promote),
`CanaryRequestBody` (.../canary: the version and a `canary.CanaryPolicy`) and `RepositoryRequestBody`
(POST /v2/repository/models/{model}/load|unload, on the gateway and on every replica). Unknown
fields are ignored, as the routes always did, except in a canary's policy (a misspelt setting there
would silently judge the canary by a default).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from distml.core.errors import DistmlError
from distml.core.refs import parse_version
from distml.serve.canary import CanaryPolicy


def _version(value: Any, info: ValidationInfo) -> int:
    """3, "3" or, with the route's model NAME in the validation context, "NAME:3"."""
    try:
        return parse_version(value, (info.context or {}).get("model"))
    except DistmlError as exc:
        raise ValueError(str(exc)) from None


#: A model version: a positive integer; "3" on the wire (what clients have always sent).
ModelVersion = Annotated[
    int,
    BeforeValidator(_version),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "pattern": "^([^:]+:)?[0-9]+$"}, {"type": "integer", "minimum": 1}],
            "description": 'a positive version number: "3" (or 3, or "NAME:3" of the model in the route)',
        }
    ),
]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]


class _Body(BaseModel):
    """An admin body; fields beyond those listed are ignored."""

    model_config = ConfigDict(extra="ignore")

    what: ClassVar[str]
    expected: ClassVar[str]


class ScaleRequestBody(_Body):
    what = "scale request"
    expected = '{"replicas": <integer 0..256>}'

    replicas: StrictInt = Field(ge=0, le=256, description="replicas per shard group")


class RollRequestBody(_Body):
    what = "roll request"
    expected = '{"models": ["<ref>", ...]} with at least one model reference'

    models: list[Annotated[StrictStr, Field(min_length=1)]] = Field(
        min_length=1, description="references: NAME, NAME:VERSION or NAME@ALIAS"
    )


class TrafficRequestBody(_Body):
    what = "traffic split"
    expected = '{"versions": {"<version>": <weight>, ...}} with at least one version'

    versions: dict[ModelVersion, Weight] = Field(min_length=1, description="weights >= 0, relative")

    @model_validator(mode="after")
    def _some_weight(self) -> TrafficRequestBody:
        if sum(self.versions.values()) <= 0:
            raise ValueError("at least one version needs a weight > 0")
        return self


class PromoteRequestBody(_Body):
    what = "promotion"
    expected = '{"version": "<version>"}'

    version: ModelVersion


class CanaryRequestBody(CanaryPolicy):
    """The version to try and how to judge it (the policy's fields, all optional)."""

    what: ClassVar[str] = "canary request"
    expected: ClassVar[str] = (
        '{"version": "<version>"} and optionally the policy: weight (0..1, default 0.2), window_s, '
        "interval_s, min_requests, max_error_rate_increase, max_p99_ratio, failure_threshold"
    )

    version: ModelVersion

    @property
    def policy(self) -> CanaryPolicy:
        return CanaryPolicy(**self.model_dump(exclude={"version"}))


class RepositoryParameters(BaseModel):
    """The model-repository extension's `parameters`; other parameters are allowed (and unused)."""

    model_config = ConfigDict(extra="allow")

    version: ModelVersion


class RepositoryRequestBody(_Body):
    what = "repository request"
    expected = '{"parameters": {"version": "<version number>"}}'

    parameters: RepositoryParameters


#: Every admin body, for the API docs.
BODIES: tuple[type[BaseModel], ...] = (
    ScaleRequestBody,
    RollRequestBody,
    TrafficRequestBody,
    PromoteRequestBody,
    CanaryRequestBody,
    RepositoryRequestBody,
)

BodyT = TypeVar("BodyT", bound=BaseModel)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problems(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p != "[key]")
        message = err["msg"].removeprefix("Value error, ")
        # a value error names the value itself; a missing field has none
        given = "" if err["type"] in ("value_error", "missing") else f" (got {_shown(err['input'])})"
        parts.append(f"{where}: {message}{given}" if where else f"{message}{given}")
    return "; ".join(parts)


def parse_body(body: type[BodyT], values: Any, model: str | None = None) -> BodyT:
    """`values` (a decoded JSON body, or a client's arguments) as a `body`, or one DistmlError (a
    400 on the gateway) naming every bad field and the body expected. `model`: the model named by
    the route, whose "NAME:3" versions are accepted."""
    try:
        return body.model_validate(values, context={"model": model})
    except ValidationError as exc:
        raise DistmlError(f"invalid {body.what}: {_problems(exc)}; expected {body.expected}") from None


def to_json(body: BaseModel) -> dict[str, Any]:
    """What a client sends for `body`: versions as strings; fields it did not set are left out, so
    that the gateway's defaults apply."""
    return body.model_dump(mode="json", exclude_unset=True)


__all__ = [
    "BODIES",
    "CanaryRequestBody",
    "ModelVersion",
    "PromoteRequestBody",
    "RepositoryParameters",
    "RepositoryRequestBody",
    "RollRequestBody",
    "ScaleRequestBody",
    "TrafficRequestBody",
    "parse_body",
    "to_json",
]
