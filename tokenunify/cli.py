"""``tokenunify <stage> ...``: one subcommand per pipeline stage (the rules call these).

Every stage takes either ``--spec JSON`` (what the Snakemake rules pass, so that Snakemake reruns
a stage whose settings changed) or ``--config FILE`` plus a dataset name (for use by hand).
``infer``, ``agglomerate``, ``skeletonize``, ``evaluate`` and ``report`` take ``--spec`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from tokenunify import __version__
from tokenunify.config import DownloadConfig, PipelineConfig, TokenizeConfig, load_config
from tokenunify.errors import ConfigError
from tokenunify.io.datasets import DatasetSpec
from tokenunify.io.sources import SourceError
from tokenunify.settings import defaults, from_section

log = logging.getLogger("tokenunify")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _stage_config(args) -> tuple[PipelineConfig | None, dict]:
    """(typed config or None, the stage's JSON spec) from --config or --spec."""
    if args.spec:
        return None, _spec(args)
    if not args.config:
        raise ConfigError("give --config FILE (and a dataset) or --spec JSON")
    cfg = load_config(args.config, deep=False)
    return cfg, {}


def _stage(cls, section: str, cfg: PipelineConfig | None, spec: dict, **extra):
    """The one way every stage gets its typed settings: section ``section`` of the config file
    (--config) or of --spec, validated against the schema and filled with its defaults
    (:func:`tokenunify.settings.from_section`); ``extra`` sets the run-time fields."""
    return from_section(cls, cfg.raw[section] if cfg is not None else spec.get(section), section,
                        **extra)


def _dataset(cfg: PipelineConfig | None, spec: dict, name: str) -> DatasetSpec:
    if cfg is not None:
        if name not in cfg.datasets:
            raise ConfigError(f"dataset {name!r} is not declared; declared: "
                              f"{sorted(cfg.datasets)}")
        return cfg.datasets[name]
    from tokenunify.settings import validate_config

    full = validate_config({"datasets": {name: spec["dataset"]}})
    return DatasetSpec.from_dict(name, full["datasets"][name])


def cmd_download(args) -> None:
    from tokenunify import download

    cfg, spec = _stage_config(args)
    ds = _dataset(cfg, spec, args.dataset)
    download.run(ds, args.out, _stage(DownloadConfig, "download", cfg, spec, workers=args.workers))


def cmd_tokenize(args) -> None:
    from tokenunify import tokenize

    cfg, spec = _stage_config(args)
    tokenize.run(args.volume, args.out, args.manifest,
                 _stage(TokenizeConfig, "tokenize", cfg, spec, workers=args.workers))


def _relaunch_under_torchrun(nproc: int | None, config_nproc: int) -> bool:
    """Re-run this command under torchrun (see :func:`tokenunify.train.distributed.plan_launch`:
    ``--nproc`` locally, the job's GPUs and nodes under Slurm), unless already in torchrun or the
    plan is one process. Returns True when it did (the caller then stops)."""
    from tokenunify.train import distributed

    if distributed.in_torchrun():
        return False
    plan = distributed.plan_launch(nproc, config_nproc)
    if plan.world <= 1:
        return False
    # drop --nproc: torchrun's parser would take it for an abbreviation of --nproc-per-node
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    code = distributed.launch(plan, argv)
    if code:
        raise RuntimeError(f"torchrun failed with exit code {code}")
    return True


def _experiment(cfg, spec, name: str) -> tuple[dict, dict]:
    """(experiment entry, pipeline config or spec) from --config or --spec."""
    if cfg is not None:
        if name not in cfg.experiments:
            raise ConfigError(f"experiment {name!r} is not declared; declared: "
                              f"{sorted(cfg.experiments)}")
        return cfg.experiments[name], cfg.raw
    return spec["experiment"], spec


def cmd_pretrain(args) -> None:
    from tokenunify.train.pretrain import PretrainConfig, run

    cfg, spec = _stage_config(args)
    exp, full = _experiment(cfg, spec, args.experiment)
    pcfg = _stage(PretrainConfig, "pretrain", cfg, spec)
    if _relaunch_under_torchrun(args.nproc, pcfg.nproc):
        return
    run(args.tokens, args.out, args.experiment, exp["pretraining"], pcfg, full)


def cmd_finetune(args) -> None:
    from tokenunify.train.finetune import FinetuneConfig, run

    cfg, spec = _stage_config(args)
    _, full = _experiment(cfg, spec, args.experiment)
    # validation merges as the agglomerate stage will
    agg = {**defaults("agglomerate"), **full.get("agglomerate", {})}
    fcfg = _stage(FinetuneConfig, "finetune", cfg, spec, scoring=agg["scoring"],
                  fragments=agg["fragments"])
    if _relaunch_under_torchrun(args.nproc, fcfg.nproc):
        return
    run(args.pretrained, args.train, args.validate, args.out, args.experiment, fcfg)


def cmd_infer(args) -> None:
    from tokenunify.inference import InferConfig, run

    cfg = _stage(InferConfig, "infer", None, _spec(args))
    if args.workers:
        cfg = dataclasses.replace(cfg, workers=args.workers)
    if args.worker_threads:  # blocks at once; torch's thread count stays infer.threads
        cfg = dataclasses.replace(cfg, threads_per_worker=args.worker_threads)
    run(args.volume, args.checkpoint, args.out, cfg, batch=args.batch)


def cmd_import_weights(args) -> None:
    from tokenunify.model.emmamba import preset
    from tokenunify.model.loading import import_official

    import_official(args.src, args.out, preset(args.preset, out_channels=args.out_channels))


def cmd_preview(args) -> None:
    from tokenunify.data.preview import save_preview

    save_preview(args.out, args.real or os.environ.get("TOKENUNIFY_DATA"))


def cmd_check(args) -> None:
    cfg = load_config(args.config, deep=True)
    log.info("config OK: %d datasets (%s), experiments %s", len(cfg.datasets),
             ", ".join(f"{n}: {'/'.join(d.roles)}" for n, d in cfg.datasets.items()),
             sorted(cfg.experiments))


def _spec(args) -> dict:
    """``--spec`` as a dict ({} without it)."""
    try:
        return json.loads(args.spec) if args.spec else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--spec is not valid JSON: {exc}") from exc


def cmd_agglomerate(args) -> None:
    from tokenunify.agglomerate import AgglomerateConfig, run

    cfg = _stage(AgglomerateConfig, "agglomerate", None, _spec(args))
    if args.workers:
        cfg = dataclasses.replace(cfg, workers=args.workers)
    run(args.affinities, args.out, cfg, phase=args.phase, batch=args.batch)


def cmd_evaluate(args) -> None:
    from tokenunify.evaluate import EvaluateConfig, run

    run(args.segmentation, args.volume, args.out, args.experiment, args.dataset,
        _stage(EvaluateConfig, "evaluate", None, _spec(args)), skeletons=args.skeletons)


def cmd_skeletonize(args) -> None:
    from tokenunify.evaluate import EvaluateConfig
    from tokenunify.skeletons import skeletonize_volume

    cfg = _stage(EvaluateConfig, "evaluate", None, _spec(args))
    skeletonize_volume(args.volume, args.out, cfg.skeletons)


def cmd_export(args) -> None:
    import pandas as pd

    from tokenunify.export import ExportConfig, run
    from tokenunify.report.tables import chosen_threshold, validated_thresholds

    spec = _spec(args)
    if args.threshold is not None:
        threshold = args.threshold
    else:
        if not args.metrics:
            raise ConfigError("give --threshold, or --metrics (and --validation) to use the "
                              "report's choice")
        metrics = pd.read_csv(args.metrics).assign(experiment=args.experiment,
                                                   dataset=args.dataset)
        validated = validated_thresholds(pd.concat(
            [pd.read_csv(v).assign(experiment=args.experiment) for v in args.validation])
        ) if args.validation else {}
        threshold = chosen_threshold(metrics, args.experiment, args.dataset, validated)
    run(args.volume, args.segmentation, args.affinities, args.out, threshold,
        _stage(ExportConfig, "export", None, spec))


def cmd_view(args) -> None:
    import time

    from tokenunify.viewer import view

    viewer, servers = view(args.folders, bind=args.bind, port=args.port, shot=args.screenshot,
                           size=tuple(args.size), layout=args.layout)
    try:
        if args.screenshot:
            print(f"screenshot written to {args.screenshot}")
            return
        print(f"Neuroglancer: {viewer.get_viewer_url()}  (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.shutdown()


def cmd_report(args) -> None:
    from tokenunify.report import build_report
    from tokenunify.report.inputs import ReportInputs

    spec = _spec(args)
    report = {**defaults("report"), **spec.get("report", {})}
    build_report(ReportInputs.from_json(args.inputs), Path(args.out), spec.get("experiments", []),
                 spec.get("test_datasets", []), spec.get("config", {}),
                 fixed_threshold=float(report["fixed_threshold"]),
                 validate_datasets=spec.get("validate_datasets", []), runs=spec.get("runs"),
                 baselines=report["baselines"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenunify", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="stage", required=True)

    def common(sp):
        sp.add_argument("--config", help="pipeline config YAML (config/config.yaml)")
        sp.add_argument("--spec", help="stage settings as JSON (what the rules pass)")
        sp.add_argument("--workers", type=int, default=2, help="threads / Dask workers")

    sp = sub.add_parser("check", help="validate a config and open every declared source")
    sp.add_argument("--config", required=True)
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("preview", help="PNG of synthetic sections beside real EM sections")
    sp.add_argument("--out", default="synthetic_preview.png")
    sp.add_argument("--real", default=None,
                    help="folder with the real datasets (default: $TOKENUNIFY_DATA; none: "
                         "synthetic sections only)")
    sp.set_defaults(func=cmd_preview)

    sp = sub.add_parser("download", help="copy a declared dataset into results/data/NAME.zarr")
    sp.add_argument("dataset")
    sp.add_argument("--out", required=True, help="output .zarr folder")
    common(sp)
    sp.set_defaults(func=cmd_download)

    sp = sub.add_parser("tokenize", help="cut a downloaded volume into crops / tokens")
    sp.add_argument("volume", help="results/data/NAME.zarr")
    sp.add_argument("--out", required=True, help="output tokens .zarr folder")
    sp.add_argument("--manifest", required=True, help="output manifest .parquet")
    common(sp)
    sp.set_defaults(func=cmd_tokenize)

    sp = sub.add_parser("pretrain", help="pretrain one experiment on tokenized crops")
    sp.add_argument("experiment")
    sp.add_argument("--tokens", nargs="*", default=[],
                    help="results/tokens/NAME.zarr ... (none for pretraining 'none')")
    sp.add_argument("--out", required=True, help="output folder results/models/EXP/pretrain")
    sp.add_argument("--nproc", type=int, default=None,
                    help="torchrun processes per node (default: the GPUs of the Slurm job, "
                         "else pretrain.nproc)")
    sp.add_argument("--config", help="pipeline config YAML (config/config.yaml)")
    sp.add_argument("--spec", help="stage settings as JSON (what the rules pass)")
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("infer", help="blockwise affinity prediction with Dask")
    sp.add_argument("volume", help="results/data/NAME.zarr")
    sp.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint (3 channels)")
    sp.add_argument("--out", required=True, help="output affinities.zarr")
    sp.add_argument("--spec", help='settings as JSON: {"infer": {...}}')
    sp.add_argument("--workers", type=int, default=None, help="Dask worker processes")
    sp.add_argument("--worker-threads", type=int, default=None,
                    help="Dask threads per worker: blocks predicted at once by each worker. "
                         "The affinities do not depend on it (nor on --workers): every block "
                         "computes with infer.threads torch threads")
    sp.add_argument("--batch", type=int, default=None,
                    help="predict only batch N of infer.batch_blocks blocks (no commit)")
    sp.set_defaults(func=cmd_infer)

    sp = sub.add_parser("finetune", help="fine-tune a pretrained EMmamba for affinities")
    sp.add_argument("experiment")
    sp.add_argument("--pretrained", required=True, help="pretraining checkpoint.pt")
    sp.add_argument("--train", nargs="+", required=True, help="results/data/NAME.zarr (train)")
    sp.add_argument("--validate", nargs="*", default=[], help="results/data/NAME.zarr (validate)")
    sp.add_argument("--out", required=True, help="output folder results/models/EXP/finetune")
    sp.add_argument("--nproc", type=int, default=None,
                    help="torchrun processes per node (default: the GPUs of the Slurm job, "
                         "else finetune.nproc)")
    sp.add_argument("--config", help="pipeline config YAML (config/config.yaml)")
    sp.add_argument("--spec", help="stage settings as JSON (what the rules pass)")
    sp.set_defaults(func=cmd_finetune)

    sp = sub.add_parser("import-weights", help="convert an official TokenUnify checkpoint")
    sp.add_argument("src", help="official checkpoint ({'model': state_dict}, 'module.' prefixes)")
    sp.add_argument("--out", required=True, help="our checkpoint to write")
    sp.add_argument("--preset", default="base", help="EMmamba preset of the weights")
    sp.add_argument("--out-channels", type=int, default=1,
                    help="output channels of the model (1 pretraining, 3 affinities)")
    sp.set_defaults(func=cmd_import_weights)

    sp = sub.add_parser("agglomerate", help="affinities -> segmentation per threshold")
    sp.add_argument("affinities", help="results/EXP/NAME/affinities.zarr")
    sp.add_argument("--out", required=True, help="output segmentation.zarr")
    sp.add_argument("--spec", help='settings as JSON: {"agglomerate": {...}}')
    sp.add_argument("--workers", type=int, default=None, help="parallel block tasks")
    sp.add_argument("--phase", default=None,
                    help="run only this phase: fragments, edges, merge, relabel, or levelK / "
                         "downK (level K of agglomerate.hierarchy going up / its segment ids "
                         "going down); with --batch N, batch N of agglomerate.batch_blocks "
                         "blocks (nodes for levelK and downK)")
    sp.add_argument("--batch", type=int, default=None, help="the batch of --phase (default all)")
    sp.set_defaults(func=cmd_agglomerate)

    sp = sub.add_parser("evaluate", help="VOI / ARAND of every threshold against labels")
    sp.add_argument("segmentation", help="results/EXP/NAME/segmentation.zarr")
    sp.add_argument("--volume", required=True, help="results/data/NAME.zarr (with labels)")
    sp.add_argument("--out", required=True, help="output metrics.csv")
    sp.add_argument("--experiment", required=True)
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--skeletons", default=None,
                    help="ground-truth skeletons (.npz from `tokenunify skeletonize`): adds "
                         "ERL / NERL along them")
    sp.add_argument("--spec", help='settings as JSON: {"evaluate": {...}}')
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("skeletonize", help="ground-truth skeletons of a volume's labels "
                                            "(kimimaro), for ERL / NERL")
    sp.add_argument("volume", help="results/data/NAME.zarr (with labels)")
    sp.add_argument("--out", required=True, help="output .npz")
    sp.add_argument("--spec", help='settings as JSON: {"evaluate": {"skeletons": {...}}}')
    sp.set_defaults(func=cmd_skeletonize)

    sp = sub.add_parser("export", help="Neuroglancer precomputed layers (raw, affinities, "
                                       "segmentation, ground truth, meshes) of one result")
    sp.add_argument("segmentation", help="results/EXP/NAME/segmentation.zarr")
    sp.add_argument("--volume", required=True, help="results/data/NAME.zarr")
    sp.add_argument("--affinities", default=None, help="results/EXP/NAME/affinities.zarr")
    sp.add_argument("--out", required=True, help="output folder (results/EXP/NAME/neuroglancer)")
    sp.add_argument("--threshold", type=float, default=None,
                    help="export the segmentation at the computed threshold nearest this")
    sp.add_argument("--metrics", default=None,
                    help="this result's metrics.csv: without --threshold, the report's choice "
                         "(minimum VOI here, or on --validation when given)")
    sp.add_argument("--validation", nargs="*", default=[],
                    help="the experiment's metrics.csv on the validate datasets")
    sp.add_argument("--experiment", default="experiment")
    sp.add_argument("--dataset", default="dataset")
    sp.add_argument("--spec", help='settings as JSON: {"export": {...}}')
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("view", help="open exported results in a local Neuroglancer viewer")
    sp.add_argument("folders", nargs="+", help="export folders (results/EXP/NAME/neuroglancer)")
    sp.add_argument("--bind", default="127.0.0.1", help="address to serve on (default local)")
    sp.add_argument("--port", type=int, default=0, help="viewer port (default: a free one)")
    sp.add_argument("--layout", default="xy-3d", help="Neuroglancer layout (xy, xy-3d, 4panel)")
    sp.add_argument("--screenshot", default=None,
                    help="write a PNG from headless Chromium and exit")
    sp.add_argument("--size", type=int, nargs=2, default=[1000, 700], help="screenshot px")
    sp.set_defaults(func=cmd_view)

    sp = sub.add_parser("report", help="the HTML report comparing the experiments")
    sp.add_argument("--inputs", required=True,
                    help="JSON: every file to read, by role (metrics, segmentation, affinities, "
                         "data, training, benchmarks; see tokenunify.report.inputs)")
    sp.add_argument("--out", required=True, help="output index.html")
    sp.add_argument("--spec", help="JSON: experiments, test_datasets, validate_datasets, "
                    "config, report")
    sp.set_defaults(func=cmd_report)
    return p


def _output_lock(args):
    """Hold the command's output for its whole run (see :mod:`tokenunify.io.locks`): whole
    runs exclusively, batch jobs (``--batch`` / ``--phase``) shared plus their own batch.
    Processes started by torchrun run under their launcher's lock."""
    from contextlib import nullcontext

    from tokenunify.io.locks import hold_output

    out = getattr(args, "out", None)
    if out is None or args.stage in ("check", "preview"):
        return nullcontext()
    if args.stage in ("pretrain", "finetune"):
        from tokenunify.train.distributed import in_torchrun

        if in_torchrun():
            return nullcontext()
    phase, batch = getattr(args, "phase", None), getattr(args, "batch", None)
    part = None
    if phase is not None or batch is not None:
        part = f"{phase or 'batch'}{'' if batch is None else batch}"
    return hold_output(out, part)


def _disk_full(exc: OSError, args) -> str:
    """An ENOSPC message that names the output being written and the free space there."""
    out = Path(getattr(args, "out", None) or ".").resolve()
    where = exc.filename or out
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    return (f"no space left on device while writing {where} (output {out}; {free:.2f} GiB "
            f"free on its file system). Free space and rerun: finished blocks and checkpoints "
            f"in the .partial folder are kept")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        with _output_lock(args):
            args.func(args)
    # CheckpointError is a ValueError (not imported here: it would load torch for every stage)
    except (ConfigError, SourceError, NotImplementedError, ValueError, OSError,
            RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            log.error("%s", _disk_full(exc, args))
        else:
            log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
