"""Pipeline configuration: schema validation with defaults, typed stage configs, deep checks.

The schema is ``workflow/schemas/config.schema.yaml`` (shipped in the package as
``tokenunify/schema/config.schema.yaml``). :func:`validate_config` fills in every default and
raises :class:`ConfigError` naming the offending key. :func:`check_config` then opens every
declared source and checks what a schema cannot: files exist, HDF5 keys exist, raw and label
shapes agree, bounding boxes fit, labelled roles have labels, test labels are not all 0, and
the stages' crops, windows and blocks fit each other and the volumes (:mod:`tokenunify.checks`).
The Snakefile runs both before any job is scheduled, so a bad config never destroys earlier
results and a stage never fails on a limit known from the start.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from tokenunify import checks

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LABELLED_ROLES = ("train", "validate", "test")


class ConfigError(ValueError):
    """A configuration problem; the message names the key, file or value at fault."""


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


def _explain(err: jsonschema.ValidationError, root: dict) -> str:
    where = _path_str(err.absolute_path)
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
        return _explain(_branch_error(err), root)
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
    root = load_schema()
    cls = _fill_defaults(jsonschema.validators.validator_for(root))
    validator = cls(root)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = [_explain(e, root) for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(msgs)))
    return config


# --------------------------------------------------------------------------- typed views


@dataclass(frozen=True)
class MappingSpec:
    """Supervoxel -> body table: ``key`` in file ``source`` (None = the labels file)."""

    key: str
    source: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    """One volume source (see the schema for the meaning of each field)."""

    source: str
    key: str | None = None
    mip: int = 0
    allow_missing: bool = False
    intensity_range: tuple[float, float] | None = None
    mapping: MappingSpec | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "source") -> SourceSpec:
        d = dict(d)
        d["source"] = expand_env(str(d["source"]), where)
        if d.get("mapping"):
            d["mapping"] = MappingSpec(**d["mapping"])
        if d.get("intensity_range") is not None:
            d["intensity_range"] = tuple(d["intensity_range"])
        return cls(**d)


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, where: str) -> str:
    """Replace ``${VAR}`` with the environment variable's value (paths of shared data that
    differ between machines); an unset variable is a ConfigError naming it and ``where``."""
    def sub(m):
        if m.group(1) not in os.environ:
            raise ConfigError(f"{where}: environment variable {m.group(1)} is not set "
                              f"(used in {value!r})")
        return os.environ[m.group(1)]

    return _ENV_RE.sub(sub, value)


@dataclass(frozen=True)
class DatasetSpec:
    """A declared dataset. Sizes in voxels (z, y, x), voxel_size and offset in nm (z, y, x)."""

    name: str
    raw: SourceSpec
    labels: SourceSpec | None = None
    voxel_size: tuple[float, float, float] | None = None
    offset: tuple[float, float, float] | None = None
    bbox: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    roles: tuple[str, ...] = ("pretrain",)
    description: str = ""

    @classmethod
    def from_dict(cls, name: str, d: dict) -> DatasetSpec:
        if not NAME_RE.match(name):
            raise ConfigError(f"datasets.{name}: invalid dataset name {name!r}")
        bbox = d.get("bbox")
        return cls(
            name=name,
            raw=SourceSpec.from_dict(d["raw"], f"datasets.{name}.raw.source"),
            labels=(SourceSpec.from_dict(d["labels"], f"datasets.{name}.labels.source")
                    if d.get("labels") else None),
            voxel_size=tuple(d["voxel_size"]) if d.get("voxel_size") else None,
            offset=tuple(d["offset"]) if d.get("offset") is not None else None,
            bbox=(tuple(bbox["start"]), tuple(bbox["stop"])) if bbox else None,
            roles=tuple(d.get("roles", ("pretrain",))),
            description=d.get("description", ""),
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what the schema describes)."""
        d = asdict(self)
        d.pop("name")
        if self.bbox:
            d["bbox"] = {"start": list(self.bbox[0]), "stop": list(self.bbox[1])}
        return json.loads(json.dumps(d))


@dataclass(frozen=True)
class DownloadConfig:
    """Download stage settings: block (z, y, x) voxels per read/write and zarr chunk."""

    block: tuple[int, int, int] = (32, 256, 256)
    workers: int = 2


@dataclass(frozen=True)
class TokenizeConfig:
    """Tokenize stage settings; sizes in voxels (z, y, x). See the schema for each field."""

    crop: tuple[int, int, int] = (16, 160, 160)
    patch: tuple[int, int, int] = (4, 16, 16)
    stride: tuple[int, int, int] | None = None
    cover_edges: bool = True
    normalize: str = "per_crop"
    max_zero_fraction: float = 0.5
    min_std: float = 2.0
    min_section_std: float = 1.0
    max_defective_sections: int = 0
    scheduler: str = "threads"
    workers: int = 2
    chunks: tuple[int, int, int] | None = None

    def __post_init__(self):
        for c, p in zip(self.crop, self.patch, strict=True):
            if c % p:
                raise ConfigError(f"tokenize.crop {list(self.crop)} is not a multiple of "
                                  f"tokenize.patch {list(self.patch)}")

    @classmethod
    def from_dict(cls, d: dict) -> TokenizeConfig:
        d = dict(d)
        for k in ("crop", "patch", "stride", "chunks"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class PipelineConfig:
    """The whole validated config as typed objects."""

    datasets: dict[str, DatasetSpec]
    experiments: dict[str, dict]
    download: DownloadConfig
    tokenize: TokenizeConfig
    pretrain: dict = field(default_factory=dict)
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> PipelineConfig:
        config = validate_config(copy.deepcopy(config))
        return cls(
            datasets={n: DatasetSpec.from_dict(n, d) for n, d in config["datasets"].items()},
            experiments=config["experiments"],
            download=DownloadConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in config["download"].items()}),
            tokenize=TokenizeConfig.from_dict(config["tokenize"]),
            pretrain=config["pretrain"],
            raw=config,
        )


# --------------------------------------------------------------------------- deep checks


def open_dataset(spec: DatasetSpec, fetch: bool = True):
    """Open a dataset's raw and label volumes (bbox applied) after checking them.

    Args:
        spec: the dataset.
        fetch: download remote files now; with False an uncached remote file gives (None, None).

    Returns:
        (raw, labels) :class:`~tokenunify.io.sources.Volume` objects; labels may be None.

    Raises:
        ConfigError: a file is missing, a key is wrong, shapes disagree, the bbox does not fit,
            no voxel size is known, or a labelled role has no labels.
    """
    from tokenunify.io.sources import Cropped, SourceError, open_source

    where = f"datasets.{spec.name}"
    for role in spec.roles:
        if role in LABELLED_ROLES and spec.labels is None:
            raise ConfigError(f"{where}.roles: role '{role}' needs labels, but "
                              f"{where}.labels is not set")
    try:
        raw = open_source(spec.raw, where=f"{where}.raw", fetch=fetch)
        labels = (open_source(spec.labels, where=f"{where}.labels", fetch=fetch)
                  if spec.labels else None)
    except SourceError as exc:
        raise ConfigError(str(exc)) from exc
    if raw is None or (spec.labels is not None and labels is None):
        return None, None  # remote file not fetched yet: the download job checks it
    shape = tuple(raw.shape)
    if labels is not None and tuple(labels.shape) != shape:
        raise ConfigError(
            f"{where}: raw shape {list(shape)} (z, y, x) from {spec.raw.source} and labels shape "
            f"{list(labels.shape)} from {spec.labels.source} disagree"
        )
    if spec.bbox is not None:
        start, stop = spec.bbox
        for ax, (a, b, n) in enumerate(zip(start, stop, shape, strict=True)):
            if not 0 <= a < b <= n:
                raise ConfigError(
                    f"{where}.bbox: axis {'zyx'[ax]} range [{a}, {b}) does not fit in the "
                    f"source shape {list(shape)}"
                )
        raw = Cropped(raw, start, stop)
        labels = Cropped(labels, start, stop) if labels is not None else None
    if spec.voxel_size is None and raw.voxel_size is None:
        raise ConfigError(f"{where}.voxel_size: not set, and {spec.raw.source} carries none; "
                          "give it in nm as [z, y, x]")
    return raw, labels


def check_dataset(spec: DatasetSpec) -> None:
    """Deep-check one dataset without downloading remote files (see :func:`open_dataset`)."""
    open_dataset(spec, fetch=False)


def _check_experiments(cfg: PipelineConfig) -> None:
    """Experiment names, and the datasets and crops that pretraining and fine-tuning need."""
    reserved = {"data", "tokens", "models", "benchmarks", "report"}
    clash = sorted(reserved & set(cfg.experiments))
    if clash:
        raise ConfigError(f"experiments: names {clash} are reserved (they are folders of "
                          "results/); rename the experiment")
    pretraining = sorted(n for n, e in cfg.experiments.items() if e["pretraining"] != "none")
    if pretraining:
        if not any("pretrain" in d.roles for d in cfg.datasets.values()):
            raise ConfigError(f"experiments {pretraining} pretrain, but no dataset has role "
                              "'pretrain' (datasets.NAME.roles)")
        if any(c % 16 for c in cfg.tokenize.crop):
            raise ConfigError(f"tokenize.crop {list(cfg.tokenize.crop)}: EMmamba needs every "
                              "axis divisible by 16")
    _check_runs(cfg)
    # with test datasets every experiment is fine-tuned: the test datasets are segmented with
    # its fine-tuned model and the report lists it (workflow/rules/common.smk final_outputs)
    tests = sorted(n for n, d in cfg.datasets.items() if "test" in d.roles)
    if tests and cfg.experiments and not any("train" in d.roles for d in cfg.datasets.values()):
        raise ConfigError(f"experiments {sorted(cfg.experiments)} are fine-tuned to segment the "
                          f"test datasets {tests}, and fine-tuning needs a dataset with role "
                          "'train', but none has it (datasets.NAME.roles)")


def _check_runs(cfg: PipelineConfig) -> None:
    """Run names (experiment x seed) are valid and distinct; ``report.baselines`` are declared
    experiments, and asking for paired intervals over seeds needs at least 2 seeds."""
    from tokenunify.runs import runs

    names = [r.name for r in runs(cfg.raw)]
    bad = [n for n in names if not NAME_RE.match(n)]
    if bad:
        raise ConfigError(f"seeds: run names {bad} (experiment-seedN) are not valid names "
                          "(letters, digits, '_', '-', '.', at most 64 characters): shorten the "
                          "experiment names")
    seeds = cfg.raw.get("seeds")
    clash = sorted(set(names) & set(cfg.experiments)) if seeds else []
    if clash:
        raise ConfigError(f"experiments {clash} have the name of a run of another experiment "
                          f"with seeds {seeds}: rename them")
    baselines = cfg.raw["report"]["baselines"]
    unknown = sorted(set(baselines) - set(cfg.experiments))
    if unknown:
        raise ConfigError(f"report.baselines: {unknown} are not declared experiments; "
                          f"declared: {sorted(cfg.experiments)}")
    n = len(seeds) if seeds else 1
    if baselines and n < 2:
        raise ConfigError(f"report.baselines {baselines} asks for paired intervals over seeds, "
                          f"but there {'is 1 seed' if seeds else 'are no seeds'} (seeds: "
                          f"{seeds}); give at least 2 seeds, e.g. seeds: [0, 1, 2], or drop "
                          "report.baselines")


def _raise_problems(problems: list[str]) -> None:
    """Raise ConfigError listing every problem found (none: return)."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def _check_test_labels(cfg: PipelineConfig, volumes: dict) -> None:
    """Every test dataset's labels hold a non-zero id: all-0 ground truth (0 = ignored) scores
    nothing, and its metrics would be empty. Reads ``download.block`` boxes up to the first
    non-zero one (one read for ordinary labels). Remote sources are left out: files not fetched
    yet (``volumes`` holds None for them) and precomputed layers (read over the network)."""
    from tokenunify.io.sources import PrecomputedVolume, SourceError

    for name, (_, labels) in volumes.items():
        spec = cfg.datasets[name]
        if ("test" not in spec.roles or labels is None
                or isinstance(getattr(labels, "base", labels), PrecomputedVolume)):
            continue
        try:
            box = checks.first_nonzero_block(labels, cfg.download.block)
        except SourceError as exc:
            raise ConfigError(str(exc)) from exc
        if box is None:
            inside = f" inside datasets.{name}.bbox" if spec.bbox else ""
            raise ConfigError(
                f"datasets.{name}.labels: every voxel of {spec.labels.source} (key "
                f"{spec.labels.key}) is 0{inside}, shape {list(labels.shape)}; a 'test' dataset "
                "needs non-zero neuron ids to be scored (0 is background, ignored): fix the "
                "labels' source or key, or drop the 'test' role")


def _source_boxes(cfg: PipelineConfig, volumes: dict) -> dict:
    """Per dataset, (start, stop) voxels of its raw source that it reads: its bbox, else the
    whole source (stop None when the source is not fetched yet)."""
    boxes = {}
    for name, (raw, _) in volumes.items():
        spec = cfg.datasets[name]
        if spec.bbox is not None:
            boxes[name] = (tuple(spec.bbox[0]), tuple(spec.bbox[1]))
        else:
            boxes[name] = ((0, 0, 0), None if raw is None else tuple(raw.shape))
    return boxes


def check_config(config: dict) -> PipelineConfig:
    """Validate against the schema, then check what a schema cannot, before any job runs:
    experiment names and the roles they need, the limits of the stage settings
    (:mod:`tokenunify.checks`), every dataset's sources (:func:`open_dataset`, without
    downloading), crops and windows against the volumes, test datasets that overlap a train or
    validate dataset of the same source (a leak), and that test labels are not all 0.
    Returns the typed config."""
    cfg = PipelineConfig.from_dict(config)
    _check_experiments(cfg)
    _raise_problems(checks.setting_problems(cfg.raw))
    volumes = {name: open_dataset(spec, fetch=False) for name, spec in cfg.datasets.items()}
    shapes = {name: None if raw is None else tuple(raw.shape)
              for name, (raw, _) in volumes.items()}
    _raise_problems(checks.size_problems(cfg.raw, shapes))
    _raise_problems(checks.leak_problems(cfg.raw, _source_boxes(cfg, volumes)))
    _check_test_labels(cfg, volumes)
    return cfg


def load_config(path: str | Path, deep: bool = True) -> PipelineConfig:
    """Read, validate and (optionally) deep-check a config file."""
    data = load_yaml(path)
    try:
        return check_config(data) if deep else PipelineConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
