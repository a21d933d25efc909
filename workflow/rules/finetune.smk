# Stage 4: fine-tune each experiment's pretrained EMmamba for affinities on the train datasets.


rule finetune:
    input:
        pretrained="results/models/{experiment}/pretrain",
        train=train_volumes,
        validate=validate_volumes,
    output:
        directory("results/models/{experiment}/finetune"),
    log:
        "logs/finetune/{experiment}.log",
    benchmark:
        "results/benchmarks/finetune/{experiment}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=finetune_spec,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "tokenunify finetune {wildcards.experiment} --pretrained {input.pretrained}/checkpoint.pt"
        " --train {input.train} --validate {input.validate} --out {output}"
        " --spec {params.spec:q} > {log} 2>&1"
