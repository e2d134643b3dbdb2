"""One check of every setting against the annotation of the parameter that takes it (pydantic).

Each `_target_` node of a config is checked against its target's signature: a key the target does not take is
named with the closest one it does, and each value is validated by pydantic against the parameter's annotation,
with the limits declared there (`moss.settings`: positive counts, finite rates, probabilities, bounded sizes,
mappings that refuse unknown keys). Settings that are not arguments of a target (`seed`, `export.*` of
train.yaml) are checked the same way against a `TypedDict` of the command (`check_mapping`). Every problem is
reported at once, one line each, naming the key, the value and (in pydantic's words) what is allowed.

A user's own target in `conf/local/` gets the same check with nothing to register: its annotations are its
schema. What pydantic cannot judge from a config is left to the target: a parameter typed with a class whose
instances are built elsewhere (a tokenizer, a `torch.dtype` given by name), or a node with a `_target_` of its
own (checked against its own signature).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError
from typing_extensions import NotRequired, Required, get_type_hints, is_typeddict

if TYPE_CHECKING:  # omegaconf is imported where a run's config is checked: a model folder's check needs only pydantic
    from omegaconf import DictConfig

_CONFIG = ConfigDict(arbitrary_types_allowed=True, allow_inf_nan=False)
_UNJUDGED = {"is_instance_of", "is_subclass_of", "callable_type"}  # a class's instance, built from the config
_MISSING = object()


def schema_problems(cfg: DictConfig | dict) -> list[str]:
    """One line per setting of a `_target_` node that its target refuses (unknown key, wrong type, out of range)."""
    from omegaconf import OmegaConf

    cfg = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    problems = [*_resolution_problems(cfg)]
    for prefix, node in _target_nodes(OmegaConf.to_container(cfg, resolve=False)):
        problems += _node_problems(cfg, prefix, node)
    return problems


def check_mapping(cfg: DictConfig, schema: type, node: str = "") -> list[str]:
    """Problems of the settings at `node` of `cfg` (the top level: "") against those the `TypedDict` declares."""
    prefix = f"{node}." if node else ""
    values = {key: v for key in get_type_hints(schema) if (v := _value(cfg, f"{prefix}{key}")) is not _MISSING}
    problems = _validate(_adapter(schema), values, "", schema.__name__, schema)
    return [f"{prefix}{problem}" for problem in problems]


def check_values(values: dict, schema: type, owner: str) -> list[str]:
    """Problems of a plain mapping read from a file (a config.json) against a `TypedDict` declaring its keys."""
    return _validate(_adapter(schema), values, "", owner, schema)


def _resolution_problems(cfg: DictConfig) -> list[str]:
    """Interpolations that loop or name what does not exist (an unset environment variable, a missing key)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    reasons: dict[str, str] = {}  # one line per cause: the first key it breaks (the others depend on it)
    for key in setting_keys(OmegaConf.to_container(cfg, resolve=False)):
        try:
            OmegaConf.select(cfg, key, throw_on_missing=False, throw_on_resolution_failure=True)
        except OmegaConfBaseException as err:
            reason = str(err).splitlines()[0]
            if isinstance(err.__cause__, MissingMandatoryValue) or reason.startswith("MissingMandatoryValue"):
                continue  # an unset `???` it points to: named by the check of required settings
            if "HydraConfig was not set" not in reason:  # ${hydra:...} outside a Hydra run (a test composing)
                reasons.setdefault(reason, key)
    return [f"{key} cannot be resolved: {reason}; fix or override {key}" for reason, key in reasons.items()]


def setting_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a plain config container: its mappings, list items and values, outermost first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    own = [prefix[:-1]] if prefix else []
    return own + [k for key, value in items for k in setting_keys(value, f"{prefix}{key}.")]


def _target_nodes(node, prefix: str = ""):
    """(`key.`, node) for every mapping with a string `_target_`, outermost first."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield prefix, node
        for key, value in node.items():
            yield from _target_nodes(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _target_nodes(value, f"{prefix}{index}.")


def _has_target(value) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_target(v) for v in value)
    return False


def _value(cfg: DictConfig, key: str):
    """The resolved plain value at `key`; _MISSING when unset (`???`) or unresolvable (reported elsewhere)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException:  # `???`, or an interpolation `_resolution_problems` names
        return _MISSING
    return value


def _node_problems(cfg: DictConfig, prefix: str, node: dict) -> list[str]:
    target = node["_target_"]
    try:
        parameters, open_ended = _parameters(target)
    except Exception as err:  # noqa: BLE001 - an import or lookup failure is the user's to see
        return [f"{prefix}_target_={target} cannot be loaded ({type(err).__name__}: {err})"]
    problems = []
    for key, raw in node.items():
        if key.startswith("_"):  # _target_, _partial_, _recursive_, _convert_, _args_
            continue
        if key not in parameters:
            if not open_ended:
                problems.append(_unknown(prefix, key, list(parameters), target))
            continue
        adapter, annotation = parameters[key]
        if adapter is None or _has_target(raw):
            continue
        value = _value(cfg, f"{prefix}{key}")
        if value is not _MISSING:
            problems += _validate(adapter, value, f"{prefix}{key}", target, annotation)
    return problems


def _unknown(prefix: str, key: str, names: list[str], owner: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"it takes {', '.join(names)}"
    return f"{prefix}{key} is not a setting of {owner}; {hint} (drop the {prefix}{key} override)"


def _validate(adapter: TypeAdapter, value, key: str, owner: str, annotation) -> list[str]:
    """One line per key below `key` whose value the annotation refuses; every error, none stops the others."""
    try:
        adapter.validate_python(value)
        return []
    except ValidationError as err:
        errors = err.errors(include_url=False)
    if any(e["type"] in _UNJUDGED for e in errors):
        return []  # one branch wants an instance built from this value: the target judges it
    lines: dict[str, str] = {}  # a whole line per key: a missing, unknown or badly named key
    refused: dict[str, tuple[object, list[str]]] = {}  # a value per key, with every reason (one per union branch)
    for error in errors:
        path, here = _path(value, error["loc"])
        where = ".".join(map(str, [key, *path] if key else path))
        message = error["msg"][0].lower() + error["msg"][1:]
        if error["type"] == "missing":
            name = f"{where}.{error['loc'][-1]}" if where else str(error["loc"][-1])
            lines[name] = f"{name} is required ({owner} takes no {where or 'settings'} without it)"
        elif error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            parent, _, unknown = where.rpartition(".")
            known = _mapping_keys(annotation, path[:-1])
            lines[where] = _unknown(f"{parent}." if parent else "", unknown, known, owner)
        elif error["loc"][-1:] == ("[key]",):  # a mapping's key: a source's name
            lines[where] = f"{where} is refused as a name: {message}"
        elif message not in refused.setdefault(where, (here, []))[1]:
            refused[where][1].append(message)
    bad_values = [
        f"{k}={v!r} is refused: {' or '.join(m)} ({owner})" for k, (v, m) in refused.items() if k not in lines
    ]
    return [*lines.values(), *bad_values]


def _path(value, loc: tuple) -> tuple[list, object]:
    """The keys and indices of `loc` found in `value`, and the value they lead to.

    pydantic puts the names of union branches between them (`loc` of `str | list[str]` given 5: `("str",)`).
    """
    path, here = [], value
    for part in loc:
        if (isinstance(here, dict) and part in here) or (isinstance(here, list) and isinstance(part, int)):
            path.append(part)
            here = here[part]
    return path, here


def _branches(annotation) -> list:
    """The types an annotation allows, Annotated and unions unwrapped."""
    if get_origin(annotation) in (Annotated, Required, NotRequired):
        return _branches(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [b for arg in get_args(annotation) for b in _branches(arg)]
    return [annotation]


def _annotation_at(annotation, dotted: str):
    """The annotation of the setting `dotted` inside a mapping setting typed by `annotation`."""
    for part in [p for p in dotted.split(".") if p]:
        inner = None
        for branch in _branches(annotation):
            if is_typeddict(branch) or dataclasses.is_dataclass(branch):
                inner = get_type_hints(branch, include_extras=True).get(part)
            elif get_origin(branch) is dict and len(get_args(branch)) == 2:
                inner = get_args(branch)[1]
            elif get_origin(branch) in (list, tuple, Sequence) and get_args(branch) and part.isdigit():
                inner = get_args(branch)[0]
            if inner is not None:
                break
        if inner is None:
            return Any
        annotation = inner
    return annotation


def _mapping_keys(annotation, path: list) -> list[str]:
    """The keys of the `TypedDict` at `path` inside `annotation` (for 'did you mean')."""
    inner = _annotation_at(annotation, ".".join(map(str, path)))
    for branch in _branches(inner):
        if is_typeddict(branch) or dataclasses.is_dataclass(branch):
            return list(get_type_hints(branch))
    return []


@functools.cache
def _parameters(target: str) -> tuple[dict[str, tuple[TypeAdapter | None, Any]], bool]:
    """The target's parameters with a validator each (None: not checkable here), and whether it takes **kwargs."""
    from hydra.utils import get_object

    obj = get_object(target)
    try:
        signature = inspect.signature(obj, eval_str=True)
    except (NameError, TypeError, AttributeError):  # annotations naming what only type checkers import
        signature = inspect.signature(obj)
    parameters = {}
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
            continue
        annotation = p.annotation if p.annotation is not p.empty and not isinstance(p.annotation, str) else Any
        parameters[p.name] = (_adapter(annotation), annotation)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    return parameters, open_ended


def _adapter(annotation) -> TypeAdapter | None:
    if annotation is Any:
        return None
    try:
        return TypeAdapter(annotation, config=_CONFIG)
    except PydanticUserError:  # a TypedDict or dataclass brings its own config
        try:
            return TypeAdapter(annotation)
        except Exception:  # noqa: BLE001 - a type pydantic cannot check is left to its target
            return None
    except Exception:  # noqa: BLE001
        return None
