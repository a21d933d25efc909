# Config validation (before any job runs) and the helpers the rules use.
import functools
import json
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

from tokenunify.cluster import block_count, hierarchy_phase, n_batches, planned_shape
from tokenunify.config import ConfigError, check_config, validate_config
from tokenunify.runs import run_of, runs, stage_settings

try:
    # Fill schema defaults into `config` (so params carry them), then open every source.
    validate_config(config)
    CFG = check_config(config)
except ConfigError as exc:
    raise WorkflowError(f"config error: {exc}") from None

DATASETS = sorted(config["datasets"])
# the {experiment} wildcard names a run: an experiment, or an experiment and a seed (seeds:)
EXPERIMENTS = [r.name for r in runs(config)]
PRETRAIN_DATASETS = [d for d in DATASETS if "pretrain" in config["datasets"][d]["roles"]]
TRAIN_DATASETS = [d for d in DATASETS if "train" in config["datasets"][d]["roles"]]
VALIDATE_DATASETS = [d for d in DATASETS if "validate" in config["datasets"][d]["roles"]]
TEST_DATASETS = [d for d in DATASETS if "test" in config["datasets"][d]["roles"]]


wildcard_constraints:
    dataset="|".join(re.escape(d) for d in DATASETS),
    experiment="|".join(re.escape(e) for e in EXPERIMENTS),
    batch=r"\d+",
    phase="fragments|edges|relabel",


def download_spec(wildcards):
    """JSON settings of the download job (tracked by Snakemake's params trigger)."""
    return json.dumps(
        {
            "dataset": config["datasets"][wildcards.dataset],
            "download": config["download"],
        },
        sort_keys=True,
    )


def tokenize_spec(wildcards):
    """JSON settings of the tokenize job."""
    return json.dumps({"tokenize": config["tokenize"]}, sort_keys=True)


def pretrain_tokens(wildcards):
    """Token stores of every dataset with role pretrain."""
    return expand("results/tokens/{dataset}.zarr", dataset=PRETRAIN_DATASETS)


def pretrain_spec(wildcards):
    """JSON settings of one experiment's pretraining."""
    return json.dumps(
        {
            "experiment": config["experiments"][run_of(config, wildcards.experiment).experiment],
            "pretrain": stage_settings(config, wildcards.experiment, "pretrain"),
        },
        sort_keys=True,
    )


def train_volumes(wildcards):
    """Downloaded volumes of every dataset with role train."""
    return expand("results/data/{dataset}.zarr", dataset=TRAIN_DATASETS)


def validate_volumes(wildcards):
    """Downloaded volumes of every dataset with role validate."""
    return expand("results/data/{dataset}.zarr", dataset=VALIDATE_DATASETS)


def finetune_spec(wildcards):
    """JSON settings of one experiment's fine-tuning."""
    return json.dumps(
        {
            "experiment": config["experiments"][run_of(config, wildcards.experiment).experiment],
            "finetune": stage_settings(config, wildcards.experiment, "finetune"),
            # validation merges as the agglomerate stage will
            "agglomerate": {k: config["agglomerate"][k] for k in ("scoring", "fragments")},
        },
        sort_keys=True,
    )


def infer_spec(wildcards):
    """JSON settings of blockwise inference."""
    return json.dumps({"infer": config["infer"]}, sort_keys=True)


@functools.cache
def dataset_shape(dataset):
    """(z, y, x) of results/data/DATASET.zarr, or of the declared source before the download
    (None: a remote source not fetched yet). Opened once per dataset."""
    return planned_shape(f"results/data/{dataset}.zarr", CFG.datasets[dataset])


@functools.cache
def batch_count(dataset, stage):
    """Snakemake jobs per phase of a blockwise stage (infer, agglomerate) on a dataset:
    ceil(blocks / STAGE.batch_blocks), from the downloaded volume's shape or, before the
    download, the declared source's. A remote source not fetched yet plans 1 batch; the
    stage's final job then does every block (correct, only not spread over jobs)."""
    if stage == "agglomerate" and config["agglomerate"]["method"] != "blockwise":
        return 1  # method waterz works on the whole volume
    shape = dataset_shape(dataset)
    if shape is None:
        return 1
    return n_batches(block_count(shape, config[stage]["block"]), config[stage]["batch_blocks"])


def batch_markers(stage, pattern):
    """Input function: the done markers of every batch (none when the stage is one batch)."""

    def markers(wildcards):
        n = batch_count(wildcards.dataset, stage)
        if n <= 1:
            return []
        return expand(pattern, batch=range(n), experiment=wildcards.experiment,
                      dataset=wildcards.dataset)

    return markers


@functools.cache
def level_batches(dataset):
    """Snakemake jobs per level of agglomerate.hierarchy on a dataset (ceil(nodes /
    batch_blocks) each); [] without a hierarchy or when the stage is one job."""
    from tokenunify.agglomerate.levels import level_grids

    agg = config["agglomerate"]
    if not agg.get("hierarchy") or batch_count(dataset, "agglomerate") <= 1:
        return []
    shape = dataset_shape(dataset)
    grid0 = tuple(-(-n // b) for n, b in zip(shape, agg["block"]))
    return [n_batches(g[0] * g[1] * g[2], agg["batch_blocks"])
            for g in level_grids(grid0, agg["hierarchy"])]


def level_markers(wildcards, phase):
    """The done markers of every batch of one hierarchy phase (levelK or downK; [] past the
    last level)."""
    kind, level = hierarchy_phase(phase)
    counts = level_batches(wildcards.dataset)
    if not (0 if kind == "level" else 1) <= level < len(counts):
        return []
    return expand("results/{experiment}/{dataset}/segmentation.batches/{phase}_{batch}.done",
                  experiment=wildcards.experiment, dataset=wildcards.dataset, phase=phase,
                  batch=range(counts[level]))


def phase_done(wildcards, phase):
    """The one marker that every batch of ``phase`` is done: its barrier job's output when the
    phase runs in batches, else [] (one job does it all). Jobs of the next phase depend on this
    marker, not on every batch of the phase before, so the DAG has O(batches) edges, not
    O(batches^2) (10^6 blocks: 1 000 batches per phase)."""
    if hierarchy_phase(phase):
        kind, level = hierarchy_phase(phase)
        if not (0 if kind == "level" else 1) <= level < len(level_batches(wildcards.dataset)):
            return []
    elif batch_count(wildcards.dataset, "agglomerate") <= 1:
        return []
    return expand("results/{experiment}/{dataset}/segmentation.batches/{phase}.done",
                  experiment=wildcards.experiment, dataset=wildcards.dataset, phase=phase)


def agglo_barrier_inputs(wildcards):
    """Every batch marker of one phase (the barrier job's input)."""
    if hierarchy_phase(wildcards.phase):
        return level_markers(wildcards, wildcards.phase)
    return batch_markers("agglomerate", "results/{experiment}/{dataset}/segmentation.batches/"
                         f"{wildcards.phase}_{{batch}}.done")(wildcards)


def agglo_merge_inputs(wildcards):
    """The global merge needs every edges batch and, with a hierarchy, every batch of its
    levels going up and of the segment ids going down to level 1 (the merge then only checks
    that they are done)."""
    levels = len(level_batches(wildcards.dataset))
    return phase_done(wildcards, "edges") + (
        phase_done(wildcards, "down1" if levels > 1 else f"level{levels - 1}") if levels else [])


def agglo_phase_inputs(wildcards):
    """A batch of an agglomerate phase needs every batch of the phase before it (edges read
    neighbouring blocks' fragments and the global id offsets; a hierarchy level, the level
    below or the edges; relabel needs the global merge), through that phase's one marker."""
    batches = "results/{experiment}/{dataset}/segmentation.batches"
    if hierarchy_phase(wildcards.phase):
        kind, level = hierarchy_phase(wildcards.phase)
        if kind == "down":  # from the root's level down: after the level above
            top = len(level_batches(wildcards.dataset)) - 1
            return phase_done(wildcards, f"level{top}" if level == top else f"down{level + 1}")
        return phase_done(wildcards, "edges" if level == 0 else f"level{level - 1}")
    if wildcards.phase == "edges":
        return phase_done(wildcards, "fragments")
    if wildcards.phase == "relabel":
        return expand(f"{batches}/merge.done", experiment=wildcards.experiment,
                      dataset=wildcards.dataset)
    return []


def agglomerate_spec(wildcards):
    """JSON settings of the agglomerate stage."""
    return json.dumps({"agglomerate": config["agglomerate"]}, sort_keys=True)


def evaluate_spec(wildcards):
    """JSON settings of the evaluate stage."""
    return json.dumps({"evaluate": config["evaluate"]}, sort_keys=True)


def beside_batches(name):
    """A batch job's params: the final output NAME beside its marker folder
    (``.../NAME.batches/X.done`` -> ``.../NAME``), as the job sees its own output. With a
    storage provider (--default-storage-provider s3) that is the local copy's folder, so the
    batch jobs and the final job stage into one ``NAME.partial``."""
    return lambda wildcards, output: str(Path(output[0]).parent.parent / name)


def skeletons_path(wildcards):
    """The dataset's ground-truth skeletons for ERL / NERL, or none when they are off."""
    if not config["evaluate"]["skeletons"]["enabled"]:
        return []
    return f"results/data/{wildcards.dataset}.skeletons.npz"


def skeletons_arg(wildcards, input):
    """The evaluate command's --skeletons option (empty when skeletons are off)."""
    return f"--skeletons {input.skeletons}" if input.get("skeletons") else ""


def skeletonize_spec(wildcards):
    """JSON settings of the skeletonize step: only what shapes the skeletons, so that changing
    the ERL merge rule does not trace them again."""
    return json.dumps({"evaluate": {"skeletons": config["evaluate"]["skeletons"]}},
                      sort_keys=True)


def export_validation_metrics(wildcards):
    """The experiment's metrics on the validate datasets: the export writes the segmentation
    at the threshold chosen on them, as the report shows it."""
    return expand("results/{experiment}/{dataset}/metrics.csv",
                  experiment=wildcards.experiment, dataset=VALIDATE_DATASETS)


def export_spec(wildcards):
    """JSON settings of the export stage."""
    return json.dumps({"export": config["export"]}, sort_keys=True)


def report_inputs():
    """Every file the report reads, by role (tokenunify.report.inputs.ReportInputs): the
    metrics of the test and validate datasets, the test datasets' segmentations and affinities,
    every downloaded volume (voxel sizes, sections) and every model folder (training logs)."""
    scored = sorted(set(TEST_DATASETS) | set(VALIDATE_DATASETS))
    per_run = lambda pattern, datasets: {  # noqa: E731
        e: {d: pattern.format(experiment=e, dataset=d) for d in datasets} for e in EXPERIMENTS}
    return {
        "metrics": per_run("results/{experiment}/{dataset}/metrics.csv", scored),
        "segmentation": per_run("results/{experiment}/{dataset}/segmentation.zarr", TEST_DATASETS),
        "affinities": per_run("results/{experiment}/{dataset}/affinities.zarr", TEST_DATASETS),
        "neuroglancer": per_run("results/{experiment}/{dataset}/neuroglancer", TEST_DATASETS),
        "data": {d: f"results/data/{d}.zarr" for d in DATASETS},
        "training": {e: {s: f"results/models/{e}/{s}" for s in ("pretrain", "finetune")}
                     for e in EXPERIMENTS},
    }


def report_input_files(wildcards):
    """The report rule's inputs: every path of report_inputs()."""
    from tokenunify.report.inputs import ReportInputs

    return ReportInputs(**report_inputs()).files()


def report_inputs_json(wildcards, input):
    """report_inputs() and the benchmarks folder, as the command's --inputs, each path as the
    job sees its input (with a storage provider, the local copy: inputs are in the order of
    ReportInputs.files())."""
    from tokenunify.report.inputs import ReportInputs

    given = ReportInputs(**report_inputs())
    seen = dict(zip(given.files(), input, strict=True))
    mapped = {role: {k: ({kk: seen[vv] for kk, vv in v.items()} if isinstance(v, dict)
                         else seen[v]) for k, v in getattr(given, role).items()}
              for role in report_inputs()}
    return json.dumps({**mapped, "benchmarks": "results/benchmarks"}, sort_keys=True)


def report_spec(wildcards):
    """What the report needs to know: experiments, test and validate datasets (thresholds are
    chosen on the validate datasets' metrics), the config itself."""
    return json.dumps(
        {
            "experiments": EXPERIMENTS,
            "runs": {r.name: [r.experiment, r.seed] for r in runs(config)},
            "test_datasets": TEST_DATASETS,
            "validate_datasets": VALIDATE_DATASETS,
            "report": config["report"],
            "config": config,
        },
        sort_keys=True,
        default=str,
    )


def final_outputs():
    """Every dataset's data and tokens, every experiment's pretraining and, when there are test
    datasets to segment, the report (which needs everything downstream of pretraining)."""
    return (
        expand(
            [
                "results/data/{dataset}.zarr",
                "results/tokens/{dataset}.zarr",
                "results/tokens/{dataset}.manifest.parquet",
            ],
            dataset=DATASETS,
        )
        + expand("results/models/{experiment}/pretrain", experiment=EXPERIMENTS)
        + (["results/report/index.html"] if TEST_DATASETS else [])
    )
