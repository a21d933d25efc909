# Stage 2: cut each volume into training crops (token layout) with a manifest of kept/dropped crops.


rule tokenize:
    input:
        zarr="results/data/{dataset}.zarr",
    output:
        zarr=directory("results/tokens/{dataset}.zarr"),
        manifest="results/tokens/{dataset}.manifest.parquet",
    log:
        "logs/tokenize/{dataset}.log",
    benchmark:
        "results/benchmarks/tokenize/{dataset}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=tokenize_spec,
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "tokenunify tokenize {input.zarr} --out {output.zarr} --manifest {output.manifest}"
        " --spec {params.spec:q} --workers {threads} > {log} 2>&1"
