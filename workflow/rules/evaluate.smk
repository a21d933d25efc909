# Stage 7: VOI split / merge and ARAND of every threshold against the test dataset's labels,
# and the expected run length (ERL / NERL) along skeletons traced once from those labels.


rule skeletonize:
    input:
        volume="results/data/{dataset}.zarr",
    output:
        "results/data/{dataset}.skeletons.npz",
    log:
        "logs/skeletonize/{dataset}.log",
    benchmark:
        "results/benchmarks/skeletonize/{dataset}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=skeletonize_spec,
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "tokenunify skeletonize {input.volume} --out {output} --spec {params.spec:q} > {log} 2>&1"


rule evaluate:
    input:
        segmentation="results/{experiment}/{dataset}/segmentation.zarr",
        volume="results/data/{dataset}.zarr",
        skeletons=skeletons_path,
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
        skeletons=skeletons_arg,
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "tokenunify evaluate {input.segmentation} --volume {input.volume} --out {output}"
        " --experiment {wildcards.experiment} --dataset {wildcards.dataset}"
        " {params.skeletons} --spec {params.spec:q} > {log} 2>&1"
