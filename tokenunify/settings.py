"""The config schema as the one source of every setting's default and allowed values.

``workflow/schemas/config.schema.yaml`` (shipped in the package as
``tokenunify/schema/config.schema.yaml``) declares each section's keys, defaults and limits.
The stage dataclasses take their field defaults from it (:func:`defaults`), and every stage is
built from its config section the same way (:func:`from_section`): the section is validated
against the schema and filled with its defaults, lists become tuples, and nested sections
(``dask``, ``augment``, ``objective``, ``curriculum``) become their own dataclasses. A
dataclass's ``__post_init__`` keeps only checks that span several fields, which a schema
cannot state.

This module sits at the bottom of the package: it imports only :mod:`tokenunify.errors`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from tokenunify.errors import ConfigError


@cache
def load_schema() -> dict:
    """The config JSON schema (a dict), read with ``yaml.safe_load``."""
    text = resources.files("tokenunify").joinpath("schema/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file safely; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _fill_defaults(validator_class):
    """A jsonschema validator class that also writes ``default`` values into the instance."""
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _path_str(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _allowed_keys(schema: dict, root: dict) -> list[str]:
    if "$ref" in schema:
        ref = schema["$ref"].split("/")[-1]
        schema = root["$defs"][ref]
    return sorted(schema.get("properties", {}))


def _explain(err: jsonschema.ValidationError, root: dict, prefix: tuple = ()) -> str:
    where = _path_str((*prefix, *err.absolute_path))
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = _allowed_keys(err.schema, root)
        extra = [k for k in err.instance if k not in allowed]
        hints = []
        for key in extra:
            close = difflib.get_close_matches(key, allowed, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        return f"{where}: unknown key {', '.join(hints)}; allowed keys: {', '.join(allowed)}"
    if "propertyNames" in err.schema_path:
        return (
            f"{where}: invalid name {err.instance!r}: names start with a letter or digit and "
            "hold only letters, digits, '_', '-', '.' (max 64 characters)"
        )
    if err.validator == "enum":
        close = difflib.get_close_matches(str(err.instance), [str(e) for e in err.validator_value])
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: {err.instance!r} is not one of {err.validator_value}{hint}"
    if err.validator in ("oneOf", "anyOf") and err.context:
        return _explain(_branch_error(err), root, prefix)
    if err.validator == "uniqueItems":
        return f"{where}: {err.instance!r} repeats a value; give distinct values"
    if err.validator == "exclusiveMinimum" and err.validator_value == 0:
        return f"{where}: must be positive, got {err.instance!r}"
    return f"{where}: {err.message}"


def _branch_error(err: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """The error to report for a failed oneOf/anyOf. An optional key is "null or X": when the
    value is not null, what is wrong is X's error (e.g. a negative voxel size), not that the
    value is not null, so the null branch's error is left out."""
    errors = err.context
    if err.instance is not None:
        errors = [e for e in errors if not (e.validator == "type" and e.validator_value == "null")
                  ] or errors
    return jsonschema.exceptions.best_match(errors)


def validate_config(config: dict) -> dict:
    """Validate a config dict against the schema and fill in defaults (in place).

    Args:
        config: the parsed YAML (e.g. Snakemake's ``config``).

    Returns:
        The same dict, with every default filled in.

    Raises:
        ConfigError: naming the first offending key and listing all problems found.
    """
    return _validate(config, load_schema())


def _validate(instance: dict, schema: dict, prefix: tuple = ()) -> dict:
    """Validate ``instance`` against ``schema`` (a section's, with the root's ``$defs``) and
    fill in its defaults, in place; errors name keys under ``prefix``."""
    root = load_schema()
    cls = _fill_defaults(jsonschema.validators.validator_for(root))
    errors = sorted(cls(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = [_explain(e, root, prefix) for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(msgs)))
    return instance


def _resolve(node: dict, root: dict) -> dict:
    if "$ref" in node:
        ref = root["$defs"][node["$ref"].split("/")[-1]]
        node = {**ref, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def section_schema(*path: str) -> dict:
    """The schema of the section at ``path`` (e.g. ``("infer", "dask")``), references resolved."""
    root = load_schema()
    node = root
    for key in path:
        props = _resolve(node, root).get("properties", {})
        if key not in props:
            raise KeyError(f"the config schema has no section {'.'.join(path)}")
        node = props[key]
    return _resolve(node, root)


def _tuples(value):
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


@cache
def _defaults(path: tuple[str, ...]) -> dict:
    return {key: _tuples(copy.deepcopy(sub["default"]))
            for key, sub in section_schema(*path).get("properties", {}).items()
            if "default" in sub}


def defaults(*path: str) -> dict:
    """The schema default of every key of a section that has one, lists as tuples (a copy)."""
    return dict(_defaults(path))


def _validate_section(path: tuple[str, ...], section: dict) -> dict:
    """``section`` validated against its schema and filled with its defaults (a copy)."""
    root = load_schema()
    node = root
    for key in path:
        node = _resolve(node, root)["properties"][key]
    return _validate(copy.deepcopy(section), {**node, "$defs": root["$defs"]}, path)


def from_section(cls, section: dict | None, path: tuple[str, ...] | str | None = None,
                 **extra):
    """Build the stage dataclass ``cls`` from its config section.

    Args:
        cls: the dataclass (its fields are the section's keys, plus run-time fields that are
            not config keys, given in ``extra``).
        section: the section as in the config (may be partial: the schema fills the rest).
        path: the section's place in the config, e.g. ``"infer"`` or ``("pretrain",
            "objective")``; None builds without the schema (nested sections of a validated one).
        extra: fields that are not config keys (e.g. ``workers`` from the command line).

    Raises:
        ConfigError: the section breaks the schema (the message names the key).
    """
    if isinstance(path, str):
        path = (path,)
    values = dict(section or {})
    if path is not None:
        values = _validate_section(path, values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = ".".join(path) if path else cls.__name__
        raise ConfigError(f"{where}: unknown keys {unknown}")
    out = {}
    for key, value in values.items():
        factory = fields[key].default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            out[key] = value if isinstance(value, factory) else from_section(factory, value)
        else:
            out[key] = _tuples(value)
    return cls(**out, **extra)
