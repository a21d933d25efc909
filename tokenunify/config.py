"""Pipeline configuration: typed views of the validated config, and deep checks.

The schema is ``workflow/schemas/config.schema.yaml`` (shipped in the package as
``tokenunify/schema/config.schema.yaml``). :func:`tokenunify.settings.validate_config` fills in
every default and raises :class:`ConfigError` naming the offending key. :func:`check_config` then opens every
declared source and checks what a schema cannot: files exist, HDF5 keys exist, raw and label
shapes agree, bounding boxes fit, labelled roles have labels, test labels are not all 0, and
the stages' crops, windows and blocks fit each other and the volumes (:mod:`tokenunify.checks`).
The Snakefile runs both before any job is scheduled, so a bad config never destroys earlier
results and a stage never fails on a limit known from the start.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tokenunify import checks
from tokenunify.errors import ConfigError
from tokenunify.io.datasets import NAME_RE, DatasetSpec, open_dataset
from tokenunify.settings import (  # noqa: F401 - load_schema, validate_config: the API
    defaults,
    from_section,
    load_schema,
    load_yaml,
    validate_config,
)

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- typed views


_DOWNLOAD, _TOKENIZE = defaults("download"), defaults("tokenize")


@dataclass(frozen=True)
class DownloadConfig:
    """Download stage settings: block (z, y, x) voxels per read/write and zarr chunk."""

    block: tuple[int, int, int] = _DOWNLOAD["block"]
    workers: int = 2


@dataclass(frozen=True)
class TokenizeConfig:
    """Tokenize stage settings; sizes in voxels (z, y, x). See the schema for each field."""

    crop: tuple[int, int, int] = _TOKENIZE["crop"]
    patch: tuple[int, int, int] = _TOKENIZE["patch"]
    stride: tuple[int, int, int] | None = _TOKENIZE["stride"]
    cover_edges: bool = _TOKENIZE["cover_edges"]
    normalize: str = _TOKENIZE["normalize"]
    max_zero_fraction: float = _TOKENIZE["max_zero_fraction"]
    min_std: float = _TOKENIZE["min_std"]
    min_section_std: float = _TOKENIZE["min_section_std"]
    max_defective_sections: int = _TOKENIZE["max_defective_sections"]
    scheduler: str = _TOKENIZE["scheduler"]
    workers: int = 2
    chunks: tuple[int, int, int] | None = _TOKENIZE["chunks"]

    def __post_init__(self):
        for c, p in zip(self.crop, self.patch, strict=True):
            if c % p:
                raise ConfigError(f"tokenize.crop {list(self.crop)} is not a multiple of "
                                  f"tokenize.patch {list(self.patch)}")


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
            download=from_section(DownloadConfig, config["download"]),
            tokenize=from_section(TokenizeConfig, config["tokenize"]),
            pretrain=config["pretrain"],
            raw=config,
        )


# --------------------------------------------------------------------------- deep checks


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
    from tokenunify.io.sources import PrecomputedVolume, SourceError  # noqa: F811

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
