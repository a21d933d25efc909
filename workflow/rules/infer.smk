# Stage 5: blockwise affinity prediction (Dask) of every test dataset, per experiment.
# A volume of more than infer.batch_blocks blocks is split into one infer_batch job per batch;
# the infer job then predicts what is left (nothing, normally) and renames the result into place.
# The rule's threads only set how many blocks run at once (--worker-threads); each block computes
# with infer.threads torch threads, so the affinities do not depend on snakemake --cores.

rule infer_batch:
    input:
        volume="results/data/{dataset}.zarr",
        model="results/models/{experiment}/finetune",
    output:
        temp("results/{experiment}/{dataset}/affinities.batches/{batch}.done"),
    log:
        "logs/infer/{experiment}/{dataset}.batch{batch}.log",
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=infer_spec,
        out=beside_batches("affinities.zarr"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "tokenunify infer {input.volume} --checkpoint {input.model}/checkpoint.pt"
        " --out {params.out} --batch {wildcards.batch} --spec {params.spec:q}"
        " --worker-threads {threads} > {log} 2>&1 && touch {output}"


rule infer:
    input:
        volume="results/data/{dataset}.zarr",
        model="results/models/{experiment}/finetune",
        batches=batch_markers("infer", "results/{experiment}/{dataset}/affinities.batches/{batch}.done"),
    output:
        directory("results/{experiment}/{dataset}/affinities.zarr"),
    log:
        "logs/infer/{experiment}/{dataset}.log",
    benchmark:
        "results/benchmarks/infer/{experiment}/{dataset}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=infer_spec,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "tokenunify infer {input.volume} --checkpoint {input.model}/checkpoint.pt --out {output}"
        " --spec {params.spec:q} --worker-threads {threads} > {log} 2>&1"
