from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import TEST_AFFINE, save, synthetic_case
from sparseseg.data.io import atomic_write, load_image, load_label, read_header_shape, save_nifti, strip_nifti_ending
from sparseseg.errors import InputError


def test_save_load_round_trip_keeps_geometry(tmp_path):
    image, label = synthetic_case((12, 10, 8), seed=1)
    src = save(image, tmp_path / "img.nii.gz")
    vol = load_image([src])
    assert vol.array.shape == (1, 12, 10, 8) and vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.affine, TEST_AFFINE)
    assert vol.spacing == pytest.approx((1.0, 1.2, 1.5))
    out = save_nifti(label, tmp_path / "out" / "lab.nii.gz", vol.affine, vol.header, np.uint8)
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, TEST_AFFINE)
    assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(TEST_AFFINE)
    np.testing.assert_array_equal(np.asarray(back.dataobj), label)
    assert [p.name for p in out.parent.iterdir()] == ["lab.nii.gz"]  # no temporary file left behind


def test_four_d_file_equals_one_file_per_channel(tmp_path):
    image, _ = synthetic_case((8, 8, 8), seed=2, channels=3, ct=False)
    four_d = load_image([save(image, tmp_path / "all.nii.gz")])
    per_channel = load_image([save(image[..., c], tmp_path / f"c_{c:04d}.nii.gz") for c in range(3)])
    assert four_d.array.shape == (3, 8, 8, 8)
    np.testing.assert_array_equal(four_d.array, per_channel.array)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="file not found") as err:
        load_image([tmp_path / "nope.nii.gz"])
    assert "nope.nii.gz" in str(err.value)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header at all" * 10))
    with pytest.raises(InputError, match="cannot read NIfTI"):
        load_image([bad])
    good = save(np.zeros((8, 8, 8), np.float32), tmp_path / "trunc.nii.gz")
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError, match="trunc.nii.gz"):
        load_image([good])
    txt = tmp_path / "image.txt"
    txt.write_text("x")
    with pytest.raises(InputError, match="not an image file"):
        load_image([txt])
    with pytest.raises(InputError, match="missing.nii: file not found"):
        read_header_shape(tmp_path / "missing.nii")


def test_nan_and_inf_voxels(tmp_path):
    img = np.zeros((6, 6, 6), np.float32)
    img[1, 2, 3] = np.nan
    img[0, 0, 0] = np.inf
    with pytest.raises(InputError, match="2 NaN/Inf"):
        load_image([save(img, tmp_path / "nan.nii.gz")])


def test_label_checks(tmp_path):
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[2:4, 2:4, 2:4] = 2
    path = save(lab, tmp_path / "lab.nii.gz")
    assert load_label(path, (6, 6, 6), [0, 1, 2]).array.shape == (1, 6, 6, 6)
    with pytest.raises(InputError, match=r"label shape \(6, 6, 6\) differs from image shape \(6, 6, 5\)"):
        load_label(path, (6, 6, 5))
    with pytest.raises(InputError, match=r"label value\(s\) \[2\] not in the dataset labels \[0, 1\]"):
        load_label(path, None, [0, 1])
    as_float = save(lab.astype(np.float32), tmp_path / "float.nii.gz")
    assert load_label(as_float, None, [0, 1, 2]).array.dtype == np.int64  # integral floats are fine
    frac = lab.astype(np.float32)
    frac[0, 0, 0] = 0.5
    with pytest.raises(InputError, match="non-integer"):
        load_label(save(frac, tmp_path / "frac.nii.gz"))


def test_channel_shape_mismatch(tmp_path):
    a = save(np.zeros((6, 6, 6), np.float32), tmp_path / "a_0000.nii.gz")
    b = save(np.zeros((6, 6, 5), np.float32), tmp_path / "a_0001.nii.gz")
    with pytest.raises(InputError, match="a_0001.nii.gz: channel shape"):
        load_image([a, b])


def test_strip_ending():
    assert strip_nifti_ending("case_01.nii.gz") == "case_01"
    assert strip_nifti_ending("case.nii") == "case"


def test_atomic_write_gives_the_mode_of_a_plain_write(tmp_path):
    """A new file gets 0666 less the umask (not mkstemp's 0600); a replaced file keeps its own mode."""
    mask = os.umask(0o022)
    try:
        new = atomic_write(tmp_path / "new.txt", lambda tmp: tmp.write_text("a"))
        assert new.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        atomic_write(kept, lambda tmp: tmp.write_text("new"))
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(mask)
