# Stage 8: each experiment's result on each test dataset as Neuroglancer precomputed layers
# (raw, affinities, the segmentation at the report's threshold, ground truth, meshes).
# Open them with `tokenunify view results/EXP/NAME/neuroglancer ...`.


rule export:
    input:
        segmentation="results/{experiment}/{dataset}/segmentation.zarr",
        affinities="results/{experiment}/{dataset}/affinities.zarr",
        volume="results/data/{dataset}.zarr",
        metrics="results/{experiment}/{dataset}/metrics.csv",
        validation=export_validation_metrics,
    output:
        directory("results/{experiment}/{dataset}/neuroglancer"),
    log:
        "logs/export/{experiment}/{dataset}.log",
    benchmark:
        "results/benchmarks/export/{experiment}/{dataset}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=export_spec,
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "tokenunify export {input.segmentation} --volume {input.volume}"
        " --affinities {input.affinities} --out {output} --metrics {input.metrics}"
        " --validation {input.validation} --experiment {wildcards.experiment}"
        " --dataset {wildcards.dataset} --spec {params.spec:q} > {log} 2>&1"
