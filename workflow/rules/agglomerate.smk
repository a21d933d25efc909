# Stage 6: affinities -> segmentation at every threshold (blockwise waterz semantics, seam-free).
# More than agglomerate.batch_blocks blocks: one job per batch for each blockwise phase
# (fragments, edges, relabel) around one global merge job; with agglomerate.hierarchy, one job
# per batch of nodes for each level going up (level0, level1, ...) and for the segment ids going
# down (downK from the root's level to down1), between edges and the merge, which then only
# checks them. The agglomerate job finishes and renames the result into place. One
# batch: the agglomerate job does it all. A local barrier job per phase (PHASE.done) stands for
# all of the phase's batches, so the next phase's jobs each depend on one file.

rule agglomerate_phase:
    wildcard_constraints:
        phase="fragments|edges|relabel|level[0-9]+|down[0-9]+",
        batch="[0-9]+",
    input:
        affinities="results/{experiment}/{dataset}/affinities.zarr",
        before=agglo_phase_inputs,
    output:
        temp("results/{experiment}/{dataset}/segmentation.batches/{phase}_{batch}.done"),
    log:
        "logs/agglomerate/{experiment}/{dataset}.{phase}{batch}.log",
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=agglomerate_spec,
        out=beside_batches("segmentation.zarr"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "tokenunify agglomerate {input.affinities} --out {params.out} --phase {wildcards.phase}"
        " --batch {wildcards.batch} --spec {params.spec:q} --workers {threads} > {log} 2>&1"
        " && touch {output}"


localrules:
    agglomerate_barrier,


rule agglomerate_barrier:
    wildcard_constraints:
        phase="fragments|edges|level[0-9]+|down[0-9]+",
    input:
        agglo_barrier_inputs,
    output:
        temp("results/{experiment}/{dataset}/segmentation.batches/{phase}.done"),
    log:
        "logs/agglomerate/{experiment}/{dataset}.{phase}.log",
    conda:
        "../envs/tokenunify.yaml"
    shell:
        "echo every batch of {wildcards.phase} is done > {log} && touch {output}"


rule agglomerate_merge:
    input:
        affinities="results/{experiment}/{dataset}/affinities.zarr",
        before=agglo_merge_inputs,
    output:
        temp("results/{experiment}/{dataset}/segmentation.batches/merge.done"),
    log:
        "logs/agglomerate/{experiment}/{dataset}.merge.log",
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=agglomerate_spec,
        out=beside_batches("segmentation.zarr"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
    shell:
        "tokenunify agglomerate {input.affinities} --out {params.out} --phase merge"
        " --spec {params.spec:q} --workers {threads} > {log} 2>&1 && touch {output}"


rule agglomerate:
    input:
        affinities="results/{experiment}/{dataset}/affinities.zarr",
        batches=batch_markers("agglomerate", "results/{experiment}/{dataset}/segmentation.batches/relabel_{batch}.done"),
    output:
        directory("results/{experiment}/{dataset}/segmentation.zarr"),
    log:
        "logs/agglomerate/{experiment}/{dataset}.log",
    benchmark:
        "results/benchmarks/agglomerate/{experiment}/{dataset}.tsv"
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=agglomerate_spec,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "tokenunify agglomerate {input.affinities} --out {output} --spec {params.spec:q}"
        " --workers {threads} > {log} 2>&1"
