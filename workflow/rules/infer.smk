# Stage 5: blockwise affinity prediction (Dask) of every test dataset, per experiment.


rule infer:
    input:
        volume="results/data/{dataset}.zarr",
        model="results/models/{experiment}/finetune",
    output:
        directory("results/{experiment}/{dataset}/affinities.zarr"),
    log:
        "logs/infer/{experiment}/{dataset}.log",
    benchmark:
        "results/benchmarks/infer/{experiment}/{dataset}.tsv"
    conda:
        "../../envs/tokenunify.yaml"
    params:
        spec=infer_spec,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "tokenunify infer {input.volume} --checkpoint {input.model}/checkpoint.pt --out {output}"
        " --spec {params.spec:q} --threads {threads} > {log} 2>&1"
