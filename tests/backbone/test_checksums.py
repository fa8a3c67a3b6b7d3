"""Checksums: known values, one-pass file checksums, any chunking gives the same result."""

from __future__ import annotations

import itertools
import os
import zlib
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldf.backbone.checksums import ChecksumAccumulator, Checksums, checksum_bytes, checksum_file
from ldf.errors import NotFoundError, StorageError, UserInputError

EMPTY_BLAKE3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_empty_input_has_known_values() -> None:
    got = ChecksumAccumulator().result()
    assert got == Checksums(size=0, adler32="00000001", blake3=EMPTY_BLAKE3)


def test_known_adler32_and_blake3() -> None:
    data = b"Wikipedia"
    got = checksum_bytes(data)
    assert got.adler32 == "11e60398"  # the classic worked example of Adler-32
    assert got.blake3 == blake3.blake3(data).hexdigest()
    assert got.size == 9


def test_adler32_is_zero_padded_lowercase() -> None:
    data = b"\x00"  # adler32 = 0x00010001
    assert checksum_bytes(data).adler32 == f"{zlib.adler32(data):08x}" == "00010001"


@pytest.mark.parametrize("chunk", [1, 4096, (1 << 20) - 1, 1 << 20, 3 << 20])
def test_large_buffers_match_one_shot_hashes(chunk: int) -> None:
    # Chunks of 1 MiB and more take the two-thread path; both paths must agree.
    data = os.urandom(3 << 20) if chunk > 1 else os.urandom(5000)
    acc = ChecksumAccumulator()
    view = memoryview(data)
    for i in range(0, len(data), chunk):
        acc.update(view[i : i + chunk])
    got = acc.result()
    assert got.adler32 == f"{zlib.adler32(data):08x}"
    assert got.blake3 == blake3.blake3(data).hexdigest()
    assert got.size == len(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=20))
def test_any_chunking_gives_the_same_result(data: bytes, cuts: list[int]) -> None:
    acc = ChecksumAccumulator()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for start, end in itertools.pairwise(bounds):
        acc.update(data[start:end])
    assert acc.result() == checksum_bytes(data)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=20000), chunk=st.integers(1, 8192))
def test_checksum_file_equals_accumulator(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int
) -> None:
    path = tmp_path_factory.mktemp("cs") / "f.bin"
    path.write_bytes(data)
    assert checksum_file(path, chunk_size=chunk) == checksum_bytes(data)


def test_checksum_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such file"):
        checksum_file(tmp_path / "missing")
    with pytest.raises(StorageError, match="directory"):
        checksum_file(tmp_path)
    with pytest.raises(UserInputError):
        checksum_file(tmp_path / "x", chunk_size=0)


def test_checksums_validate_their_fields() -> None:
    with pytest.raises(UserInputError, match="adler32"):
        Checksums(size=1, adler32="ABCDEF01", blake3=EMPTY_BLAKE3)
    with pytest.raises(UserInputError, match="blake3"):
        Checksums(size=1, adler32="00000001", blake3="xyz")
    with pytest.raises(UserInputError, match="size"):
        Checksums(size=-1, adler32="00000001", blake3=EMPTY_BLAKE3)


def test_differences_name_each_field() -> None:
    a = checksum_bytes(b"a")
    b = checksum_bytes(b"bb")
    diffs = a.differences(b)
    assert [d.split()[0] for d in diffs] == ["size", "adler32", "blake3"]
    assert a.differences(a) == []
