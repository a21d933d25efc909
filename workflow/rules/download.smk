# Stage 1: copy each declared dataset into results/data/{dataset}.zarr (raw uint8, labels uint64).


rule download:
    output:
        zarr=directory("results/data/{dataset}.zarr"),
    log:
        "logs/download/{dataset}.log",
    benchmark:
        "results/benchmarks/download/{dataset}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=download_spec,
    threads: 2
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "tokenunify download {wildcards.dataset} --out {output.zarr} --spec {params.spec:q}"
        " --workers {threads} > {log} 2>&1"
