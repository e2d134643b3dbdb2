"""Structured schemas for every `_target_` of a config, generated from the targets' signatures (hydra-zen).

`hydra_zen.builds(target, populate_full_signature=True)` turns a callable's signature into a structured config:
one typed field per parameter. Merging a composed node into it is OmegaConf's own structured-config check: a
setting the target does not take (`+trainer.max_step=5`, which Hydra suggests for a typo and which would die
inside instantiation or be ignored) and a value of the wrong type (`data.num_workers=two`) are refused before
anything is built. Each refusal here names the key and its fix.

The schemas are made when a config is checked, from whatever `_target_` the composition ended with, rather
than registered with Hydra's ConfigStore per group: our groups swap targets (`model.net` is `from_config` in one
option and `from_pretrained` in another, `strategy` is a string or one of three classes), and a user's own
target in `conf/local/` gets the same check with nothing to register.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import types
from typing import Any, Union, get_args, get_origin

from hydra_zen import BuildsFn
from hydra_zen.errors import HydraZenUnsupportedPrimitiveError
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


def schema_problems(cfg: DictConfig | dict) -> list[str]:
    """One message per setting of a `_target_` node that its target's schema refuses (unknown key, wrong type)."""
    container = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    return [problem for prefix, node in _target_nodes(container) for problem in _node_problems(prefix, node)]


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


def _node_problems(prefix: str, node: dict) -> list[str]:
    target = node["_target_"]
    try:
        schema, names, open_ended = _schema(target)
    except Exception as err:  # noqa: BLE001 - an import or lookup failure is the user's to see
        return [f"{prefix}_target_={target} cannot be loaded ({type(err).__name__}: {err})"]
    settings = {k: v for k, v in node.items() if not k.startswith("_")}  # _target_, _partial_, _recursive_...
    problems = []
    for key in [k for k in settings if k not in names]:
        del settings[key]
        if not open_ended:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"it takes {', '.join(names)}"
            problems.append(f"{prefix}{key} is not a setting of {target}; {hint} (drop the {prefix}{key} override)")
    while settings:  # OmegaConf stops at the first refused value: drop it and check the rest
        try:
            OmegaConf.merge(schema, settings)
            break
        except (ConfigKeyError, ValidationError) as err:
            key = re.split(r"[.\[]", str(err.full_key or err.key or ""))[0]
            if key not in settings:
                problems.append(f"{prefix.rstrip('.')}: {str(err.msg).splitlines()[0]}")
                break
            kind = _type_name(next(f.type for f in dataclasses.fields(schema) if f.name == key))
            reason = str(err.msg).splitlines()[0]
            value = settings.pop(key)
            problems.append(f"{prefix}{key}={value!r} is refused: {target} takes {kind} for {key} ({reason})")
    return problems


@functools.cache
def _schema(target: str) -> tuple[type, list[str], bool]:
    """The target's schema, its parameter names, and whether it takes any keyword (`**kwargs`)."""
    from hydra.utils import get_object

    obj = get_object(target)
    params = inspect.signature(obj).parameters.values()
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    return _SignatureSchemas.builds(obj, populate_full_signature=True), names, open_ended


def _type_name(annotation) -> str:
    if get_origin(annotation) is Union:
        return " or ".join(_type_name(a) for a in get_args(annotation))
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


class _SignatureSchemas(BuildsFn):
    """hydra-zen's `builds`, fitted to checking configs that are never instantiated through their schema.

    - `int | None` (PEP 604) is typed like `Optional[int]` (hydra-zen keeps only `typing.Union`'s types).
    - A dataclass-typed parameter (transformers' `PretrainedConfig` is one) takes a `_target_` node here, so
      it is `Any`: that node is checked against its own target's schema.
    - A default Hydra cannot hold (`dtype=torch.float32`) is left out: only keys and types are checked.
    """

    @classmethod
    def _sanitized_type(cls, type_: Any, **kwargs) -> Any:
        if isinstance(type_, types.UnionType):
            type_ = Union[get_args(type_)]  # noqa: UP007 - the typing form is the one hydra-zen reads
        if dataclasses.is_dataclass(type_):
            return Any
        return super()._sanitized_type(type_, **kwargs)

    @classmethod
    def _make_hydra_compatible(cls, value, **kwargs):
        try:
            return super()._make_hydra_compatible(value, **kwargs)
        except HydraZenUnsupportedPrimitiveError:
            return None
