# Stage 8: one self-contained HTML page comparing the experiments (tables, curves, sections).


rule report:
    input:
        metrics=expand(
            "results/{experiment}/{dataset}/metrics.csv",
            experiment=EXPERIMENTS,
            dataset=sorted(set(TEST_DATASETS) | set(VALIDATE_DATASETS)),
        ),
        segmentations=expand(
            "results/{experiment}/{dataset}/segmentation.zarr",
            experiment=EXPERIMENTS,
            dataset=TEST_DATASETS,
        ),
        models=expand("results/models/{experiment}/finetune", experiment=EXPERIMENTS),
    output:
        report(
            "results/report/index.html",
            caption="../report/report_page.rst",
            category="Report",
        ),
    log:
        "logs/report/report.log",
    conda:
        "../../envs/tokenunify.yaml"
    params:
        spec=report_spec,
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "tokenunify report --results results --out {output} --spec {params.spec:q} > {log} 2>&1"
