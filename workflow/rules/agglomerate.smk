# Stage 6: affinities -> segmentation at every threshold (blockwise waterz semantics, seam-free).


rule agglomerate:
    input:
        "results/{experiment}/{dataset}/affinities.zarr",
    output:
        directory("results/{experiment}/{dataset}/segmentation.zarr"),
    log:
        "logs/agglomerate/{experiment}/{dataset}.log",
    benchmark:
        "results/benchmarks/agglomerate/{experiment}/{dataset}.tsv"
    conda:
        "../../envs/tokenunify.yaml"
    params:
        spec=agglomerate_spec,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "tokenunify agglomerate {input} --out {output} --spec {params.spec:q}"
        " --workers {threads} > {log} 2>&1"
