#!/usr/bin/env bash
# Run by Snakemake after it creates workflow/envs/tokenunify.yaml (`--sdm conda`): install this checkout
# into the new env. Snakemake runs this copy from .snakemake/conda/, two levels below the
# directory snakemake runs in; TOKENUNIFY_SRC overrides where the package source is.
set -euo pipefail
src="${TOKENUNIFY_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
python -m pip install --no-deps "$src"
