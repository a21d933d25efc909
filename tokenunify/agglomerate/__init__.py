"""Affinities -> neuron segmentation: fragments, edge statistics, global merge, relabel.

See :mod:`tokenunify.agglomerate.blockwise` for the stage and the exact semantics.
"""

from tokenunify.agglomerate.blockwise import AgglomerateConfig, read_affinities, run, threshold_name
from tokenunify.agglomerate.fragments import section_fragments, whole_volume_fragments
from tokenunify.agglomerate.merge import MergeHistory, agglomerate_graph
from tokenunify.agglomerate.scoring import DEFAULT, parse
from tokenunify.agglomerate.whole_volume import waterz_segmentations

__all__ = ["AgglomerateConfig", "DEFAULT", "MergeHistory", "agglomerate_graph", "parse",
           "read_affinities", "run", "section_fragments", "threshold_name",
           "waterz_segmentations", "whole_volume_fragments"]
