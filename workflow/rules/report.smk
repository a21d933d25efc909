# Stage 9: one self-contained HTML page comparing the experiments (tables, curves, sections).


# Every file the report reads is an input (report_inputs in common.smk), passed to the command
# as one JSON mapping by role; only the benchmark files are read from their folder.


rule report:
    input:
        report_input_files,
    output:
        report(
            "results/report/index.html",
            caption="../report/report_page.rst",
            category="Report",
        ),
    log:
        "logs/report/report.log",
    conda:
        "../envs/tokenunify.yaml"
    params:
        spec=report_spec,
        inputs=report_inputs_json,
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "tokenunify report --inputs {params.inputs:q} --out {output} --spec {params.spec:q}"
        " > {log} 2>&1"
