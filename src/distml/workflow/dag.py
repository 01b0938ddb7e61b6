"""Pipelines as plain Python: calling steps inside a pipeline function builds the DAG.

`@step` wraps a function with its execution policy (memoization, retries, timeout, resources,
condition). Inside `build(pipeline_fn, params)`, a step call records a `Node` and returns it;
passing a node (or a list of nodes: fan-in) to another step makes an edge, `step.map(items)`
fans out, and `best_of(nodes, key)` is an asynchronous fan-in whose value is the best result
so far. Outside a pipeline, calling a step runs its function directly (handy in tests).
Like Prefect's and Kubeflow's Python DSLs, without a compiler: the graph is the calls made.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from distml.core.errors import DistmlError
from distml.scheduling.core import Resources

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,150}$")
_building: contextvars.ContextVar[Graph | None] = contextvars.ContextVar("distml_building_graph", default=None)


KINDS = {
    "task": "",
    "training": "returning the TrainConfig of the run it launches",
    "serving": 'returning {"service": ..., "model": ..., "replicas": ...}',
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a step executes; every field has exactly one default, here."""

    memoize: bool = False
    max_age: float | None = None  # seconds a memoized result stays valid
    version: str | None = None  # explicit code version instead of hashing the code
    retries: int = 0
    retry_backoff: float = 1.0  # seconds before the first retry, doubled each time
    retry_backoff_max: float = 60.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    timeout: float | None = None  # seconds per attempt, counted from when the function begins
    resources: Resources = dataclasses.field(default_factory=Resources)
    fingerprint: Callable[..., str] | None = None  # content of outside data the step reads
    when: Callable[..., bool] | None = None  # run only if true for the step's arguments
    # What the step is, for a cluster: "task" runs its function in a container; "training" is run
    # as a Kubeflow training job whose TrainConfig is spec(*args, **kwargs), its value then
    # collect(config, result, *args, **kwargs) (default: the run's result); "serving" is a KServe
    # InferenceService from spec(*args, **kwargs) -> {"service", "model", "replicas"}, called with
    # the step's literal arguments (upstream values are not known when the manifests are written).
    kind: str = "task"
    spec: Callable[..., Any] | None = None
    collect: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.retries < 0 or self.retry_backoff < 0:
            raise DistmlError(f"retries and retry_backoff must be >= 0, got {self.retries}, {self.retry_backoff}")
        if self.timeout is not None and self.timeout <= 0:
            raise DistmlError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if self.max_age is not None and self.max_age <= 0:
            raise DistmlError(f"max_age must be a positive number of seconds, got {self.max_age}")
        retry_on = self.retry_on if isinstance(self.retry_on, tuple) else (self.retry_on,)
        if not retry_on or not all(isinstance(c, type) and issubclass(c, BaseException) for c in retry_on):
            raise DistmlError(f"retry_on takes exception classes (one or a tuple), got {self.retry_on!r}")
        object.__setattr__(self, "retry_on", retry_on)
        if not isinstance(self.resources, Resources):
            raise DistmlError(f"resources must be a distml.workflow.Resources, got {self.resources!r}")
        if self.kind not in KINDS:
            raise DistmlError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind != "task" and not callable(self.spec):
            raise DistmlError(
                f'a step of kind "{self.kind}" needs spec=, a function of its arguments {KINDS[self.kind]}'
            )
        if self.kind == "task" and (self.spec is not None or self.collect is not None):
            raise DistmlError('spec= and collect= describe a "training" or "serving" step; set kind= too')
        if self.collect is not None and (self.kind != "training" or not callable(self.collect)):
            raise DistmlError('collect= is a function (config, result, *args, **kwargs) of a "training" step')


class Step:
    """A function run as a workflow step, in its own process, under a `Policy`."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None, **policy: Any):
        if not callable(fn) or inspect.iscoroutinefunction(fn):
            raise DistmlError(f"@step needs a plain function, got {fn!r}")
        self.fn = fn
        self.__wrapped_step_fn__ = fn
        self.name = name or fn.__name__
        if not _NAME.match(self.name):
            raise DistmlError(f"step name {self.name!r} must be letters, digits, '_', '-' or '.'")
        known = [f.name for f in dataclasses.fields(Policy)]
        unknown = sorted(set(policy) - set(known))
        if unknown:
            raise DistmlError(f"@step got unknown option(s) {', '.join(unknown)}; it takes name, {', '.join(known)}")
        self.policy = Policy(**policy)
        self.signature = inspect.signature(fn)
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__
        self.__qualname__ = fn.__qualname__

    def options(self, name: str | None = None, **policy: Any) -> Step:
        """A copy of this step with another name or policy fields (`train.options(retries=2)`)."""
        current = {f.name: getattr(self.policy, f.name) for f in dataclasses.fields(self.policy)}
        copy = Step(self.fn, name or self.name, **{**current, **policy})
        copy.__qualname__ = self.__qualname__
        return copy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        graph = _building.get()
        if graph is None:
            return self.fn(*args, **kwargs)
        return graph.add(self, args, kwargs)

    def map(self, items: Iterable[Any], **kwargs: Any) -> list[Node]:
        """Fan out: one node per item, the item as the first argument, `kwargs` shared."""
        graph = _building.get()
        if graph is None:
            return [self.fn(item, **kwargs) for item in items]
        items = list(items)
        return [graph.add(self, (item,), kwargs, label=_label(item, i)) for i, item in enumerate(items)]

    def __repr__(self) -> str:
        return f"<step {self.name}>"


def step(fn: Callable[..., Any] | None = None, *, name: str | None = None, **policy: Any) -> Any:
    """Decorator: `@step` or `@step(memoize=True, max_age=3600, retries=2, timeout=600,
    resources=Resources(cpus=1, workers=2), fingerprint=fn, when=predicate, version="v2",
    kind="training", spec=fn, collect=fn)` (see `Policy`)."""
    if fn is not None:
        return Step(fn, name, **policy)
    return lambda f: Step(f, name, **policy)


def _label(item: Any, index: int) -> str:
    if isinstance(item, (str, int)) and not isinstance(item, bool) and _NAME.match(str(item)):
        return str(item)
    return str(index)


@dataclasses.dataclass(eq=False)
class Node:
    """One call of a step in the pipeline (or an asynchronous fan-in)."""

    id: str
    step: Step | None  # None for best_of
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    upstream: list[Node]
    best_key: Callable[[Any], Any] | None = None  # best_of only
    minimize: bool = False
    ordering: list[Node] = dataclasses.field(default_factory=list)  # after(): wait until they are final

    @property
    def streaming(self) -> bool:
        return self.step is None

    def __repr__(self) -> str:
        return f"<node {self.id}>"

    def after(self, *nodes: Node) -> Node:
        """Run this step only once `nodes` have finished (an ordering edge that passes no value)."""
        for node in nodes:
            if not isinstance(node, Node):
                raise DistmlError(f"after() takes step results, got {node!r}")
            if node not in self.upstream:
                self.upstream.append(node)
            if node not in self.ordering:
                self.ordering.append(node)
        return self

    def __bool__(self) -> bool:
        raise DistmlError(
            f"the result of {self.id} is not known while the pipeline is being built; "
            "put the decision in a step, or use when=... on the step that depends on it"
        )


class Graph:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self._counts: dict[str, int] = {}

    def _unique(self, base: str) -> str:
        count = self._counts.get(base, 0)
        self._counts[base] = count + 1
        return base if count == 0 else f"{base}-{count + 1}"

    def add(self, step: Step, args: tuple, kwargs: dict, label: str | None = None) -> Node:
        try:
            step.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise DistmlError(f"step {step.name}: {exc}") from None
        node_id = self._unique(step.name if label is None else f"{step.name}[{label}]")
        node = Node(node_id, step, tuple(args), dict(kwargs), _nodes_in((args, kwargs)))
        self.nodes[node_id] = node
        return node

    def add_best(self, nodes: list[Node], key: Callable[[Any], Any], minimize: bool, name: str) -> Node:
        node = Node(self._unique(name), None, (list(nodes),), {}, list(nodes), best_key=key, minimize=minimize)
        self.nodes[node.id] = node
        return node

    def downstream(self) -> dict[str, list[str]]:
        edges: dict[str, list[str]] = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for up in node.upstream:
                edges[up.id].append(node.id)
        return edges


def _nodes_in(value: Any) -> list[Node]:
    found: list[Node] = []

    def visit(v: Any) -> None:
        if isinstance(v, Node):
            if v not in found:
                found.append(v)
        elif isinstance(v, (list, tuple)):
            for item in v:
                visit(item)
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)

    visit(value)
    return found


def best_of(nodes: Iterable[Node], key: Callable[[Any], Any], *, minimize: bool = False, name: str = "best") -> Node:
    """Asynchronous fan-in: a node whose value is the best result of `nodes` so far.

    Its downstream runs as soon as the first of `nodes` succeeds, and again each time one
    with a better `key(result)` (higher, or lower with `minimize=True`) arrives.
    """
    graph = _building.get()
    nodes = list(nodes)
    if graph is None:
        return (min if minimize else max)(nodes, key=key)
    if not nodes or not all(isinstance(n, Node) for n in nodes):
        raise DistmlError("best_of needs a non-empty list of step results")
    return graph.add_best(nodes, key, minimize, name)


def substitute(value: Any, resolve: Callable[[Node], Any]) -> Any:
    """`value` with every node replaced by `resolve(node)` (lists, tuples and dicts walked); a
    pydantic model (a step's typed settings) travels as its JSON."""
    if isinstance(value, Node):
        return resolve(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [substitute(v, resolve) for v in value]
    if isinstance(value, tuple):
        return tuple(substitute(v, resolve) for v in value)
    if isinstance(value, dict):
        return {k: substitute(v, resolve) for k, v in value.items()}
    return value


def coerce_params(fn: Callable[..., Any], params: dict[str, Any]) -> dict[str, Any]:
    """Check and convert pipeline parameters against the function's signature and annotations."""
    signature = inspect.signature(fn)
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        accepted = ", ".join(signature.parameters) or "none"
        raise DistmlError(f"unknown pipeline parameter(s) {', '.join(unknown)}; {fn.__name__} accepts: {accepted}")
    hints = _type_hints(fn)
    out: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if name not in params:
            if parameter.default is inspect.Parameter.empty:
                raise DistmlError(f"pipeline parameter {name!r} is required (pass --param {name}=VALUE)")
            continue
        value = params[name]
        if name in hints:
            try:
                value = TypeAdapter(hints[name]).validate_python(value)
            except ValidationError as exc:
                message = exc.errors()[0]["msg"]
                raise DistmlError(f"pipeline parameter {name}={value!r}: {message}") from None
        out[name] = value
    return out


def coerce_arguments(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> tuple[list, dict]:
    """A step's arguments as its function declares them: a parameter annotated with a pydantic
    model (`watch: CycleSettings`) gets the model, validated, from the JSON it travelled as."""
    fn = getattr(fn, "fn", fn)  # a Step: its function
    hints = _type_hints(fn)
    models = {name: hint for name, hint in hints.items() if isinstance(hint, type) and issubclass(hint, BaseModel)}
    if not models:
        return args, kwargs
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    for name, model in models.items():
        value = bound.arguments.get(name)
        if isinstance(value, dict):
            try:
                bound.arguments[name] = model.model_validate(value)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise DistmlError(f"step argument {name} is not a valid {model.__name__}: {problems}") from None
    return list(bound.args), dict(bound.kwargs)


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return {k: v for k, v in typing.get_type_hints(fn).items() if k != "return"}
    except Exception:  # unresolvable annotations: take the values as given
        return {}


def build(pipeline_fn: Callable[..., Any], params: dict[str, Any]) -> tuple[Graph, Any]:
    """Call `pipeline_fn(**params)` with step calls recorded; return the graph and what it returned."""
    graph = Graph()
    token = _building.set(graph)
    try:
        result = pipeline_fn(**coerce_params(pipeline_fn, params))
    finally:
        _building.reset(token)
    if not graph.nodes:
        raise DistmlError(f"pipeline {pipeline_fn.__name__} called no steps; decorate its steps with @step")
    return graph, result
