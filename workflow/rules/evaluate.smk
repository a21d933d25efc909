# Stage 7: VOI split / merge and ARAND of every threshold against the test dataset's labels.


rule evaluate:
    input:
        segmentation="results/{experiment}/{dataset}/segmentation.zarr",
        volume="results/data/{dataset}.zarr",
    output:
        report(
            "results/{experiment}/{dataset}/metrics.csv",
            caption="../report/metrics.rst",
            category="Metrics",
            labels={"experiment": "{experiment}", "dataset": "{dataset}"},
        ),
    log:
        "logs/evaluate/{experiment}/{dataset}.log",
    benchmark:
        "results/benchmarks/evaluate/{experiment}/{dataset}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=evaluate_spec,
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "tokenunify evaluate {input.segmentation} --volume {input.volume} --out {output}"
        " --experiment {wildcards.experiment} --dataset {wildcards.dataset}"
        " --spec {params.spec:q} > {log} 2>&1"
