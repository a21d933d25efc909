# Config validation (before any job runs) and the helpers the rules use.
import json
import re

from snakemake.exceptions import WorkflowError

from tokenunify.config import ConfigError, check_config, validate_config

try:
    # Fill schema defaults into `config` (so params carry them), then open every source.
    validate_config(config)
    check_config(config)
except ConfigError as exc:
    raise WorkflowError(f"config error: {exc}") from None

DATASETS = sorted(config["datasets"])
EXPERIMENTS = sorted(config["experiments"])
PRETRAIN_DATASETS = [d for d in DATASETS if "pretrain" in config["datasets"][d]["roles"]]
TRAIN_DATASETS = [d for d in DATASETS if "train" in config["datasets"][d]["roles"]]
VALIDATE_DATASETS = [d for d in DATASETS if "validate" in config["datasets"][d]["roles"]]
TEST_DATASETS = [d for d in DATASETS if "test" in config["datasets"][d]["roles"]]


wildcard_constraints:
    dataset="|".join(re.escape(d) for d in DATASETS),
    experiment="|".join(re.escape(e) for e in EXPERIMENTS),


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
            "experiment": config["experiments"][wildcards.experiment],
            "pretrain": config["pretrain"],
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
            "experiment": config["experiments"][wildcards.experiment],
            "finetune": config["finetune"],
        },
        sort_keys=True,
    )


def infer_spec(wildcards):
    """JSON settings of blockwise inference."""
    return json.dumps({"infer": config["infer"]}, sort_keys=True)


def agglomerate_spec(wildcards):
    """JSON settings of the agglomerate stage."""
    return json.dumps({"agglomerate": config["agglomerate"]}, sort_keys=True)


def evaluate_spec(wildcards):
    """JSON settings of the evaluate stage."""
    return json.dumps({"evaluate": config["evaluate"]}, sort_keys=True)


def report_spec(wildcards):
    """What the report needs to know: experiments, test datasets, the config itself."""
    return json.dumps(
        {
            "experiments": EXPERIMENTS,
            "test_datasets": TEST_DATASETS,
            "report": config["report"],
            "config": config,
        },
        sort_keys=True,
        default=str,
    )


def final_outputs():
    """Every dataset's data and tokens, every experiment's models, and the report."""
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
        + ["results/report/index.html"]
    )
