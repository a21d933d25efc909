"""Limits of the stage settings, checked before the first job (called by ``check_config``).

A stage that meets one of these limits fails only when it runs, after every upstream job (hours
on real data), or silently pads: a crop larger than the volume it is cut from, an inference
overlap not smaller than the window, an agglomerate block that is not a multiple of the tile.
:func:`tokenunify.config.check_config` calls these functions at DAG time and raises their
messages as a ``ConfigError``.

Every function takes plain values (the validated config dict with the schema's defaults filled
in, and dataset shapes) and returns messages naming the key and the sizes; none raises. This
module imports no stage code and nothing from :mod:`tokenunify.config`.
"""

from __future__ import annotations

import numpy as np

MODEL_MULTIPLE = 16  # EMmamba downsamples four times by 2: model inputs are multiples of 16


def _axes(axes) -> str:
    return ", ".join("zyx"[ax] for ax in axes)


def setting_problems(config: dict) -> list[str]:
    """Limits among the settings alone (no data needed): model input sizes that EMmamba cannot
    take, an inference overlap not smaller than the window, blockwise agglomerate blocks that
    are not multiples of the fragment tile."""
    out = []
    window, overlap = config["infer"]["window"], config["infer"]["overlap"]
    for key, size in (("finetune.crop", config["finetune"]["crop"]), ("infer.window", window)):
        bad = [ax for ax, n in enumerate(size) if n % MODEL_MULTIPLE]
        if bad:
            out.append(f"{key} {list(size)}: EMmamba needs every axis a multiple of "
                       f"{MODEL_MULTIPLE} (not on axis {_axes(bad)})")
    bad = [ax for ax, (w, o) in enumerate(zip(window, overlap, strict=True)) if not 0 <= o < w]
    if bad:
        out.append(f"infer.overlap {list(overlap)} must be >= 0 and smaller than infer.window "
                   f"{list(window)} on every axis (not on axis {_axes(bad)}): windows step by "
                   "window - overlap")
    agg = config["agglomerate"]
    bad = [ax for ax in (1, 2) if agg["block"][ax] % agg["tile"]]
    if agg["method"] == "blockwise" and bad:
        out.append(f"agglomerate.block {list(agg['block'])}: y and x must be multiples of "
                   f"agglomerate.tile ({agg['tile']}) with agglomerate.method blockwise (not "
                   f"on axis {_axes(bad)}), so that fragments do not depend on the block grid")
    # every fragments method but the per-section one works in 3-D tiles
    if agg["method"] == "blockwise" and agg["fragments"] != "maxima_distance" \
            and agg["block"][0] % agg["tile_z"]:
        out.append(f"agglomerate.block {list(agg['block'])}: z must be a multiple of "
                   f"agglomerate.tile_z ({agg['tile_z']}) with agglomerate.fragments "
                   f"{agg['fragments']} (3-D tiles), so that fragments do not depend on the "
                   "block grid")
    return out


def size_problems(config: dict, shapes: dict[str, tuple | None]) -> list[str]:
    """Crops and windows larger than a volume they are taken from: ``tokenize.crop`` and every
    dataset (all are tokenized), ``finetune.crop`` and the ``train`` datasets (crops are sampled
    from them), ``infer.window`` and the ``test`` and ``validate`` datasets (they are segmented
    by the pipeline; the window would be zero-padded).

    Args:
        config: the validated config dict.
        shapes: (z, y, x) of each dataset after its bbox; None (a remote source not fetched
            yet) skips the dataset.
    """
    uses = (("tokenize.crop", config["tokenize"]["crop"], (), "every dataset is tokenized"),
            ("finetune.crop", config["finetune"]["crop"], ("train",), "training crops are cut "
             "from it"),
            ("infer.window", config["infer"]["window"], ("test", "validate"), "windows would be "
             "padded with zeros"))
    out = []
    for name, shape in shapes.items():
        if shape is None:
            continue
        roles = config["datasets"][name]["roles"]
        for key, size, need, why in uses:
            role = next((r for r in need if r in roles), None)
            if need and role is None:
                continue
            bad = [ax for ax, (s, n) in enumerate(zip(size, shape, strict=True)) if s > n]
            if bad:
                out.append(f"{key} {list(size)} is larger than {role + ' ' if role else ''}"
                           f"dataset '{name}' of shape {list(shape)} (z, y, x) on axis "
                           f"{_axes(bad)} ({why}); make {key} smaller or the dataset "
                           f"(datasets.{name}) larger")
    return out


def first_nonzero_block(vol, block) -> tuple | None:
    """The first box (z, y, x raster order over ``block``-sized boxes) of ``vol`` holding a
    non-zero voxel, or None when every voxel is 0. Reads one block at a time (memory bounded by
    the block) and stops at the first non-zero one: one read for ordinary labels.

    Args:
        vol: anything with ``shape`` (z, y, x) and ``read(box)`` (a source Volume).
        block: (z, y, x) voxels per read.
    """
    from tokenunify.io.zarrio import blocks

    for _, box in blocks(tuple(vol.shape), tuple(block)):
        if np.any(vol.read(box)):
            return box
    return None


def leak_problems(config: dict, boxes: dict[str, tuple[tuple, tuple | None]]) -> list[str]:
    """``test`` datasets that share voxels with a ``train`` or ``validate`` dataset read from the
    same raw source (same ``source``, ``key`` and ``mip``): a leak, since the test score would
    then measure data the model was trained or selected on.

    Args:
        config: the validated config dict.
        boxes: per dataset, (start, stop) in voxels (z, y, x) of the source it reads (its bbox,
            or the whole source); stop None when the source's shape is not known yet (a remote
            file not fetched): then the box reaches to the end of the source.
    """
    def source(name):
        raw = config["datasets"][name]["raw"]
        return (raw["source"], raw.get("key"), raw.get("mip", 0))

    def roles(name):
        return config["datasets"][name]["roles"]

    out = []
    for test in sorted(n for n in boxes if "test" in roles(n)):
        for other in sorted(boxes):
            used = [r for r in ("train", "validate") if r in roles(other)]
            if other == test or not used or source(other) != source(test):
                continue
            (a0, a1), (b0, b1) = boxes[test], boxes[other]
            lo = [max(x, y) for x, y in zip(a0, b0, strict=True)]
            hi = [min(x if x is not None else np.inf, y if y is not None else np.inf)
                  for x, y in zip(a1 or (None,) * 3, b1 or (None,) * 3, strict=True)]
            if all(h > lo_ for lo_, h in zip(lo, hi, strict=True)):
                span = ", ".join(f"{'zyx'[i]} {lo[i]}:{'end' if hi[i] == np.inf else int(hi[i])}"
                                 for i in range(3))
                out.append(f"datasets.{test} (test) overlaps datasets.{other} "
                           f"({'/'.join(used)}) in {source(test)[0]} at {span} (voxels): the "
                           f"test score would include data used for training or selection; give "
                           f"them disjoint bbox ranges")
    return out
