"""Pipeline arrays store every chunk (all-fill ones too); require_complete finds a missing one."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tokenunify.io.zarrio import (
    IncompleteArrayError,
    create_array,
    create_volume,
    require_complete,
    writable,
)


def volume(path, shape=(4, 6, 10), chunks=(2, 3, 5), name="x"):
    g = zarr.open_group(str(path), mode="a", zarr_format=3)
    return create_volume(g, name, shape, chunks, np.uint16, (40, 8, 8), (0, 0, 0))


def test_all_fill_blocks_written_by_create_volume_are_stored(tmp_path):
    a = volume(tmp_path / "v.zarr")
    a[:] = 0  # every chunk all fill
    assert (tmp_path / "v.zarr" / "x" / "c" / "1" / "1" / "0").is_file()
    assert len(list((tmp_path / "v.zarr" / "x" / "c").rglob("*/*/*"))) == 8
    # create_volume on an existing identical array reopens it: still stores all-fill chunks
    b = volume(tmp_path / "w.zarr")
    b[:2] = 1
    volume(tmp_path / "w.zarr")[2:] = 0
    assert (tmp_path / "w.zarr" / "x" / "c" / "1" / "1" / "1").is_file()


def test_arrays_reopened_for_writing_and_small_arrays_store_every_chunk(tmp_path):
    volume(tmp_path / "v.zarr")
    # a worker task reopens the array: zarr's default config would skip all-fill chunks
    writable(zarr.open_group(str(tmp_path / "v.zarr"), mode="r+")["x"])[:] = 0
    assert (tmp_path / "v.zarr" / "x" / "c" / "0" / "0" / "0").is_file()
    g = zarr.open_group(str(tmp_path / "v.zarr"), mode="a")
    create_array(g, "m", data=np.zeros(5, np.float32), chunks=(5,))
    assert (tmp_path / "v.zarr" / "m" / "c" / "0").is_file()
    require_complete(zarr.open_group(str(tmp_path / "v.zarr"), mode="r")["x"], "test")
    require_complete(zarr.open_group(str(tmp_path / "v.zarr"), mode="r")["m"], "test")


def test_require_complete_names_the_array_and_the_missing_chunks(tmp_path):
    a = volume(tmp_path / "v.zarr")
    a[:] = 0
    a[0, 0, 0] = 7
    require_complete(a, "stage")  # complete, with all-zero chunks stored
    for key in ("c/1/0/1", "c/0/1/0"):
        (tmp_path / "v.zarr" / "x" / key).unlink()
    r = zarr.open_group(str(tmp_path / "v.zarr"), mode="r")["x"]
    with pytest.raises(IncompleteArrayError, match=r"stage: .*v\.zarr/x .*2 of 8 chunks") as e:
        require_complete(r, "stage")
    msg = str(e.value)
    assert "[0, 1, 0] (key c/0/1/0)" in msg and "[1, 0, 1] (key c/1/0/1)" in msg
    assert isinstance(e.value, ValueError) and e.value.missing == [(0, 1, 0), (1, 0, 1)]
    assert e.value.path.endswith("v.zarr/x") and e.value.total == 8


def test_require_complete_edge_grids_channels_and_shards(tmp_path):
    g = zarr.open_group(str(tmp_path / "v.zarr"), mode="a", zarr_format=3)
    aff = create_volume(g, "aff", (5, 7, 9), (2, 4, 4), np.uint8, (1, 1, 1), (0, 0, 0),
                        channels=3)  # edge chunks clipped: grid (1, 3, 2, 3)
    aff[:] = 0
    require_complete(aff, "t")
    (tmp_path / "v.zarr" / "aff" / "c" / "0" / "2" / "1" / "2").unlink()
    with pytest.raises(IncompleteArrayError, match=r"1 of 18 chunks.*\[0, 2, 1, 2\]"):
        require_complete(g["aff"], "t")
    s = create_array(g, "s", shape=(8, 8), chunks=(2, 2), shards=(4, 4), dtype="u1")
    s[:] = 0
    require_complete(s, "t")  # the shards are the stored objects
    (tmp_path / "v.zarr" / "s" / "c" / "1" / "0").unlink()
    with pytest.raises(IncompleteArrayError, match=r"1 of 4 chunks.*\[1, 0\] \(key c/1/0\)"):
        require_complete(g["s"], "t")
    empty = create_array(g, "e", shape=(0,), chunks=(1,), dtype="i8")
    require_complete(empty, "t")  # nothing to store
