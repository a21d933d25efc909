# Stage 3: pretrain one EMmamba per experiment on the tokenized crops of the pretrain datasets.


rule pretrain:
    input:
        tokens=pretrain_tokens,
    output:
        directory("results/models/{experiment}/pretrain"),
    log:
        "logs/pretrain/{experiment}.log",
    benchmark:
        "results/benchmarks/pretrain/{experiment}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=pretrain_spec,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "tokenunify pretrain {wildcards.experiment} --tokens {input.tokens} --out {output}"
        " --spec {params.spec:q} > {log} 2>&1"
