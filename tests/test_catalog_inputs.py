"""What a user hands `demix run` before anything starts: catalog tables on S3 with relative URIs, long
track ids, duplicate ids, missing columns, and output roots that cannot be one. Real files and a real S3
endpoint (moto's server behind the proxy of tests/conftest_services.py); nothing mocked."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import soundfile as sf

from demix.pipeline.batch.catalog import CatalogError, read_catalog, safe_track_id
from demix.pipeline.io import audio_info
from demix.pipeline.io.storage import StorageError, check_output_root

pytest_plugins = ["conftest_services"]

pytestmark = pytest.mark.timeout(120)


def _ogg() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((8000, 2), np.float32), 8000, format="OGG")
    return buf.getvalue()


# --- item 3: relative URIs in a catalog on an object store ------------------------------------------


def test_relative_uris_in_an_s3_catalog_are_normalised(s3):
    fs = s3.fs
    fs.pipe_file(f"{s3.name}/in/x.ogg", _ogg())
    fs.pipe_file(f"{s3.name}/cat/sub/y.ogg", _ogg())
    fs.pipe_file(
        f"{s3.name}/cat/catalog.csv",
        b"uri,track_id\n../in/x.ogg,x\n./sub/../sub/y.ogg,y\n" + f"s3://{s3.name}/cat/./sub//../../in/x.ogg,z\n".encode(),
    )
    tracks = read_catalog(s3.uri("cat/catalog.csv"))
    assert {t.track_id: t.uri for t in tracks} == {
        "x": s3.uri("in/x.ogg"), "y": s3.uri("cat/sub/y.ogg"), "z": s3.uri("in/x.ogg"),
    }
    for t in tracks:
        assert "/." not in t.uri.split("://", 1)[1]
        assert audio_info(t.uri).sample_rate == 8000, f"{t.uri} must name the real object"


@pytest.mark.parametrize("uri", ["../../x.ogg", "../../../etc/passwd", "a/../../../x.ogg"])
def test_a_relative_uri_climbing_out_of_the_bucket_is_a_catalog_error_naming_the_row(s3, uri):
    s3.fs.pipe_file(f"{s3.name}/cat/catalog.csv", f"uri\nok.ogg\n{uri}\n".encode())
    with pytest.raises(CatalogError) as info:
        read_catalog(s3.uri("cat/catalog.csv"))
    message = str(info.value)
    assert s3.uri("cat/catalog.csv") in message and uri in message and "row 2" in message
    assert "bucket" in message and "\n" not in message


# --- item 5 (library side): one clear line, found before anything starts ---------------------------


def test_missing_uri_column_and_duplicate_ids_name_the_file(tmp_path):
    table = tmp_path / "cat.csv"
    table.write_text("path,track_id\na.wav,a\n")
    with pytest.raises(CatalogError) as info:
        read_catalog(str(table))
    assert str(table) in str(info.value) and "'uri'" in str(info.value) and "path, track_id" in str(info.value)
    table.write_text("uri,track_id\na.wav,same\nb.wav,same\nc.wav,other\nd.wav,other\n")
    with pytest.raises(CatalogError) as info:
        read_catalog(str(table))
    message = str(info.value)
    assert str(table) in message and "'same'" in message and "'other'" in message and "\n" not in message


def test_output_root_checks(tmp_path, s3):
    check_output_root(str(tmp_path))  # an existing folder
    check_output_root(str(tmp_path / "new" / "deeper"))  # created later, under a writable folder
    check_output_root(s3.uri("out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (blocker, blocker / "below"):
        with pytest.raises(StorageError) as info:
            check_output_root(str(bad))
        assert str(blocker) in str(info.value) and "not a folder" in str(info.value)
    s3.fs.pipe_file(f"{s3.name}/taken", b"x")
    with pytest.raises(StorageError, match="not a folder"):
        check_output_root(s3.uri("taken"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(StorageError, match="not writable"):
            check_output_root(str(locked / "out"))


# --- item 10: long ids stay unique ------------------------------------------------------------------


def test_long_user_ids_stay_unique_stable_and_short(tmp_path):
    a, b = "A" * 4999 + "1", "A" * 4999 + "2"
    ids = [safe_track_id(a), safe_track_id(b)]
    assert ids[0] != ids[1] and ids == [safe_track_id(a), safe_track_id(b)]
    for tid in ids:
        assert len(tid) <= 128 and re.fullmatch(r"[A-Za-z0-9._-]+", tid) and tid.startswith("A" * 100)
    assert safe_track_id("B" * 128) == "B" * 128, "ids that fit are kept as they are"
    table = tmp_path / "cat.csv"
    table.write_text(f"uri,track_id\na.wav,{a}\nb.wav,{b}\n")
    assert sorted(t.track_id for t in read_catalog(str(table))) == sorted(ids)
