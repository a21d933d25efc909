"""The report stage: one self-contained HTML page comparing pretraining experiments.

Public API: :func:`build_report`. Helpers live in :mod:`.tables` (pandas tables),
:mod:`.sections` (middle-section reading, largest split / merge), :mod:`.figures` (matplotlib
figures as base64 PNG data URIs) and :mod:`.page` (HTML assembly).
"""

from tokenunify.report.build import build_report

__all__ = ["build_report"]
