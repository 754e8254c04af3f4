"""NRRD, MetaImage and DICOM series: geometry against SimpleITK and nibabel, labels, and the files' own errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import OBLIQUE, SAGITTAL, TEST_AFFINE, itk_volume, save, synthetic_case, write_dicom_series
from sparseseg.data.datasets import load_dataset
from sparseseg.data.formats import case_name, file_format, output_format_for, prediction_path
from sparseseg.data.geometry import ImageGrid, itk_geometry, ras_affine
from sparseseg.data.io import load_image, load_label, read_grid, read_header_shape
from sparseseg.data.itk_io import check_slice_positions
from sparseseg.data.outputs import write_image
from sparseseg.data.transforms import DataConfig, build_transforms
from sparseseg.errors import InputError

DIRECTIONS = {"oblique": OBLIQUE, "sagittal": SAGITTAL}


def _volume(shape=(7, 6, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, size=shape).astype(np.float32)


def _itk_geometry(image: sitk.Image) -> tuple:
    return image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def test_names_and_formats():
    assert [case_name(n) for n in ("a.nii.gz", "b.seg.nrrd", "c.nrrd", "d.mha", "e.mhd", "f_0000.nhdr")] == [
        "a", "b", "c", "d", "e", "f_0000"]
    assert [file_format(n) for n in ("a.NII.GZ", "b.seg.nrrd", "c.mhd", "d.raw", "e.dcm")] == [
        "nifti", "nrrd", "mha", None, None]
    assert [output_format_for(f, None) for f in ("nifti", "nrrd", "mha", "dicom")] == ["nifti", "nrrd", "mha", "nifti"]
    assert prediction_path("out", "c", "nrrd").as_posix() == "out/c.seg.nrrd"
    assert prediction_path("out", "c", "dicom-seg", probabilities=True).as_posix() == "out/c_probabilities.nii.gz"
    with pytest.raises(InputError, match="x.nii.gz: a DICOM SEG references a DICOM series; this input is NIfTI"):
        output_format_for("nifti", "dicom-seg", "x.nii.gz")


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_affine_conversion_matches_simpleitk_nifti_writer(tmp_path, direction):
    """Our LPS -> RAS affine equals the one SimpleITK writes into a NIfTI file (read back by nibabel), and back."""
    image = itk_volume(_volume(), DIRECTIONS[direction])
    sitk.WriteImage(image, str(tmp_path / "ref.nii.gz"))
    expected = nib.load(tmp_path / "ref.nii.gz").affine
    origin, spacing, direction_ = (np.asarray(v) for v in _itk_geometry(image))
    affine = ras_affine(origin, spacing, direction_.reshape(3, 3))
    np.testing.assert_allclose(affine, expected, atol=1e-5)
    back = itk_geometry(affine)
    np.testing.assert_allclose(back[0], origin, atol=1e-12)
    np.testing.assert_allclose(back[1], spacing, atol=1e-12)
    np.testing.assert_allclose(back[2], direction_.reshape(3, 3), atol=1e-12)


@pytest.mark.parametrize("ending", [".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_itk_file_round_trip_is_exact(tmp_path, ending, direction):
    """Read a SimpleITK-written file, write a label map on its grid: SimpleITK reads back the very same geometry."""
    array = _volume()
    src = tmp_path / f"scan{ending}"
    sitk.WriteImage(itk_volume(array, DIRECTIONS[direction]), str(src))
    vol = load_image([src])
    np.testing.assert_array_equal(vol.array[0], array)  # [X, Y, Z]: the file's voxel order, like nibabel
    ref = sitk.ReadImage(str(src))
    assert (tuple(vol.grid.origin), tuple(vol.grid.spacing), tuple(vol.grid.direction.ravel())) == _itk_geometry(ref)
    assert read_header_shape(src) == (7, 6, 5)
    label = (array > 0).astype(np.uint8)
    fmt = file_format(src)
    out = write_image(label, vol.grid, tmp_path / "out" / f"lab{'.seg.nrrd' if fmt == 'nrrd' else '.mha'}", fmt)
    back = sitk.ReadImage(str(out))
    sitk.WriteImage(ref, str(tmp_path / f"again{ending}"))  # SimpleITK's own read-and-write of the input
    assert _itk_geometry(back) == _itk_geometry(sitk.ReadImage(str(tmp_path / f"again{ending}")))  # bit for bit
    np.testing.assert_allclose(np.concatenate(_itk_geometry(back)), np.concatenate(_itk_geometry(ref)), rtol=0,
                               atol=1e-12)  # NRRD stores spacing x direction: the last bit may move
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), label)


def test_nifti_grid_written_as_nrrd_lands_on_the_same_points(tmp_path):
    """NIfTI (RAS) input, NRRD (LPS) output: every voxel maps to the same point in space."""
    src = save(_volume(), tmp_path / "scan.nii.gz")
    grid = read_grid(src)
    out = write_image(np.ones((7, 6, 5), np.uint8), grid, tmp_path / "lab.seg.nrrd", "nrrd")
    back = sitk.ReadImage(str(out))
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        lps = np.asarray(back.TransformIndexToPhysicalPoint(index))
        ras = TEST_AFFINE @ np.array([*index, 1.0])
        np.testing.assert_allclose(lps * [-1, -1, 1], ras[:3], atol=1e-5)


def test_nrrd_in_ras_space_is_converted(tmp_path):
    """A NRRD whose header says ``space: right-anterior-superior`` reads to the same RAS affine it states."""
    array = np.arange(24, dtype=np.int16).reshape(4, 3, 2)  # [X, Y, Z]
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\nsizes: 4 3 2\n"
              "space directions: (0,1.5,0) (-2,0,0) (0,0,3)\nkinds: domain domain domain\nendian: little\n"
              "encoding: raw\nspace origin: (5,6,7)\n\n")
    path = tmp_path / "ras.nrrd"
    path.write_bytes(header.encode() + array.transpose(2, 1, 0).tobytes())  # NRRD stores X fastest
    vol = load_image([path])
    np.testing.assert_array_equal(vol.array[0], array)
    expected = np.array([[0, -2, 0, 5], [1.5, 0, 0, 6], [0, 0, 3, 7], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(vol.affine, expected)
    assert nib.aff2axcodes(vol.affine) == ("A", "L", "S")


def test_multi_channel_itk_images(tmp_path):
    channels = np.stack([_volume(seed=s) for s in range(3)], -1)  # [X, Y, Z, C]
    sitk.WriteImage(itk_volume(channels), str(tmp_path / "vec.nrrd"))
    sitk.WriteImage(sitk.JoinSeries([itk_volume(channels[..., c]) for c in range(3)]), str(tmp_path / "t.mha"))
    for name in ("vec.nrrd", "t.mha"):
        vol = load_image([tmp_path / name])
        assert vol.array.shape == (3, 7, 6, 5) and read_header_shape(tmp_path / name) == (7, 6, 5, 3)
        np.testing.assert_array_equal(vol.array, np.moveaxis(channels, -1, 0))
        assert vol.grid.shape == (7, 6, 5)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_dicom_series_geometry_equals_simpleitk(tmp_path, direction):
    array = np.random.default_rng(0).integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)
    folder = write_dicom_series(array, tmp_path / "series", DIRECTIONS[direction])
    vol = load_image([folder])
    np.testing.assert_array_equal(vol.array[0], array)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    assert (tuple(vol.grid.origin), tuple(vol.grid.spacing), tuple(vol.grid.direction.ravel())) == _itk_geometry(ref)
    np.testing.assert_allclose(vol.grid.direction.ravel(), DIRECTIONS[direction], atol=1e-8)  # as written
    assert [f.name for f in vol.grid.files] == [f"s1_{k:03d}.dcm" for k in range(4)]  # slice order = Z
    assert read_header_shape(folder) == (6, 5, 4)


def test_slicer_segmentation_labels(tmp_path):
    """``.seg.nrrd`` written by slicerio (3D Slicer's reader/writer): one layer is a label map, layers are refused."""
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 1:3, 1:3], labels[4, 2:4, 0:2] = 1, 2
    ijk = np.diag([0.5, 0.6, 0.7, 1.0])
    segments = [{"id": "s1", "name": "a", "labelValue": 1, "layer": 0}, {"id": "s2", "name": "b", "labelValue": 2,
                                                                         "layer": 0}]
    slicerio.write_segmentation(str(tmp_path / "one.seg.nrrd"), {"voxels": labels, "ijkToLPS": ijk,
                                                                 "segments": segments})
    lab = load_label(tmp_path / "one.seg.nrrd", (6, 5, 4), [0, 1, 2])
    np.testing.assert_array_equal(lab.array[0], labels)
    np.testing.assert_allclose(lab.affine, np.diag([-0.5, -0.6, 0.7, 1.0]))
    layers = np.stack([labels == 1, labels >= 1]).astype(np.uint8)  # overlapping: two layers [L, X, Y, Z]
    segments[1]["layer"], segments[1]["labelValue"] = 1, 1
    slicerio.write_segmentation(str(tmp_path / "two.seg.nrrd"), {"voxels": layers, "ijkToLPS": ijk,
                                                                 "segments": segments})
    with pytest.raises(InputError, match=r"two.seg.nrrd: 3D Slicer segmentation with 2 layers \(overlapping"):
        load_label(tmp_path / "two.seg.nrrd")


def test_written_seg_nrrd_reads_in_slicerio(tmp_path):
    """Our ``.seg.nrrd`` as 3D Slicer's own reader sees it: segment names and values, and the input's geometry."""
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 1:3, 1:3], labels[4, 2:4, 0:2] = 1, 3
    grid = ImageGrid.from_itk(tmp_path / "x.nrrd", "nrrd", (6, 5, 4), (1.0, 2.0, 3.0), (0.5, 0.6, 0.7), OBLIQUE)
    out = write_image(labels, grid, tmp_path / "x.seg.nrrd", "nrrd", {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]})
    seg = slicerio.read_segmentation(str(out))
    assert [(s["name"], s["labelValue"], s["layer"]) for s in seg["segments"]] == [
        ("WT", 1, 0), ("TC", 2, 0), ("ET", 3, 0)]  # each value named by the region that paints it
    np.testing.assert_array_equal(seg["voxels"], labels)
    expected = np.eye(4)
    expected[:3, :3] = np.asarray(OBLIQUE).reshape(3, 3) @ np.diag([0.5, 0.6, 0.7])
    expected[:3, 3] = [1.0, 2.0, 3.0]
    np.testing.assert_allclose(seg["ijkToLPS"], expected, atol=1e-12)


# -- broken files: one line naming the file ----------------------------------------------------------------------


def _nrrd(tmp_path, replace: tuple[bytes, bytes] = (b"", b""), cut: int = 0):
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(itk_volume(_volume()), str(path))
    data = path.read_bytes().replace(*replace) if replace[0] else path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: _nrrd(p, (b"sizes: 7 6 5", b"sizes: 7 6")),
     "scan.nrrd: cannot read NRRD header (_nrrdReadNrrdParse_sizes: parsed 2 values, but dimension is 3)"),
    (lambda p: _nrrd(p, (b"type: float", b"type: floaty")), "scan.nrrd: cannot read NRRD header (_nrrdReadNrrdParse_"),
    (lambda p: _nrrd(p, cut=40), "scan.nrrd: cannot read NRRD (_nrrdEncodingRaw_read: fread got only"),
    (lambda p: _nrrd(p, (b"space directions: (", b"space directions: (0,0,0) (")),
     "scan.nrrd: cannot read NRRD header"),
])
def test_broken_nrrd(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        load_image([path])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_itk_geometry(tmp_path):
    flat = itk_volume(_volume()[:, :, 0][..., None])[:, :, 0]  # a 2-D image
    sitk.WriteImage(flat, str(tmp_path / "flat.mha"))
    with pytest.raises(InputError, match=r"flat.mha: expected a 3-D or 4-D volume, got 2-D shape \(7, 6\)"):
        load_image([tmp_path / "flat.mha"])
    path = tmp_path / "zero.mha"
    sitk.WriteImage(itk_volume(_volume()), str(path))
    path.write_bytes(path.read_bytes().replace(b"0.90000000000000002 2\nDimSize", b"0 2\nDimSize"))
    with pytest.raises(InputError, match=r"zero.mha: invalid voxel spacing \(0.8, 0.0, 2.0\) in the header"):
        load_image([path])


@pytest.mark.parametrize("kind, message", [
    ("two series", "folder holds 2 DICOM series (1.2.826.0.1.3680043.8.498.1, 1.2.826.0.1.3680043.8.498.2); give "
                   "each series its own folder"),
    ("missing slice", "DICOM series misses 1 slice(s) between s1_001.dcm and s1_003.dcm (4 mm apart, slices "
                      "elsewhere 2 mm)"),
    ("uneven", "DICOM series has uneven slice spacing: 2.5 mm between s1_002.dcm and s1_003.dcm, 2 mm elsewhere"),
    ("same position", "two DICOM slices at the same position (s1_002.dcm and s1_003.dcm): one series per folder"),
])
def test_broken_dicom_series(tmp_path, kind, message):
    array = np.zeros((5, 4, 6), np.int16)
    folder = tmp_path / "series"
    write_dicom_series(array, folder, skip=(2,) if kind == "missing slice" else (),
                       shift={"uneven": {3: 0.5}, "same position": {3: -2.0}}.get(kind))
    if kind == "two series":
        write_dicom_series(array, folder, series=2)
    with pytest.raises(InputError) as err:
        load_image([folder])
    assert str(err.value) == f"{folder}: {message}"


def test_slice_positions():
    """The DICOM slice checks on positions alone: even steps pass, a shift across the plane is a gantry tilt."""
    files = [Path(f"{c}.dcm") for c in "abcd"]
    normal = np.array([0.0, 0.0, 1.0])
    even = np.array([[0.0, 0.0, 2.0 * k] for k in range(4)])
    check_slice_positions(even, normal, files, Path("series"))
    tilted = even.copy()
    tilted[2:, 0] += 1.0
    with pytest.raises(InputError, match=r"series: DICOM slices shift 1 mm across their plane between b.dcm and "
                                         r"c.dcm \(a gantry tilt\?\)"):
        check_slice_positions(tilted, normal, files, Path("series"))


def test_file_ending_must_be_an_image_format(nnunet_dataset):
    meta = json.loads(nnunet_dataset.read_text())
    nnunet_dataset.write_text(json.dumps({**meta, "file_ending": ".png"}))
    with pytest.raises(InputError, match=r"dataset.json: file_ending '.png' is not an image format sparseseg reads"):
        load_dataset(nnunet_dataset)


def test_nnunet_dataset_of_nrrd_files(tmp_path):
    """nnU-Net ``file_ending: .nrrd``: the training pipeline reads images and labels with their geometry."""
    root = tmp_path / "Dataset002"
    image, label = synthetic_case((10, 9, 8), seed=1)
    for name, array, folder in (("c1_0000", image, "imagesTr"), ("c1", label, "labelsTr")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(itk_volume(array, SAGITTAL), str(root / folder / f"{name}.nrrd"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1,
                                                   "b": 2}, "numTraining": 1, "file_ending": ".nrrd"}))
    ds = load_dataset(root)
    cfg = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["background", "a", "b"], roi_size=[8, 8, 8],
                     intensity="none", orientation="RAS")
    case = ds.training[0]
    d = build_transforms(cfg, "val")({"image": [str(p) for p in case.images], "label": str(case.label)})
    assert nib.aff2axcodes(d["image"].affine.numpy()) == ("R", "A", "S")
    # the sagittal file (voxel axes A, I, L) reoriented to RAS: image and label permuted and flipped alike
    to_ras = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("A", "I", "L")),
                                             nib.orientations.axcodes2ornt(("R", "A", "S")))
    np.testing.assert_array_equal(d["image"][0].numpy(), nib.orientations.apply_orientation(image, to_ras))
    np.testing.assert_array_equal(d["label"][0].numpy(), nib.orientations.apply_orientation(label, to_ras))


def test_slicer_segmentation_of_a_block_is_placed_on_the_image_grid(tmp_path):
    """3D Slicer saves a ``.seg.nrrd`` on the extent of its segments: a block of the image grid, placed back."""
    image = itk_volume(_volume(), SAGITTAL)
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    grid = read_grid(tmp_path / "img.nrrd")
    block = np.ones((3, 2, 2), np.uint8)
    ijk = np.eye(4)
    ijk[:3, :3] = np.asarray(SAGITTAL).reshape(3, 3) @ np.diag(image.GetSpacing())
    ijk[:3, 3] = image.TransformIndexToPhysicalPoint((2, 1, 3))  # the block starts at voxel (2, 1, 3)
    segments = [{"id": "s1", "name": "a", "labelValue": 1, "layer": 0}]
    seg = {"voxels": block, "ijkToLPS": ijk, "segments": segments, "referenceImageExtentOffset": [2, 1, 3]}
    slicerio.write_segmentation(str(tmp_path / "block.seg.nrrd"), seg)
    lab = load_label(tmp_path / "block.seg.nrrd", reference=grid)
    expected = np.zeros((7, 6, 5), np.int64)
    expected[2:5, 1:3, 3:5] = 1
    np.testing.assert_array_equal(lab.array[0], expected)
    np.testing.assert_allclose(lab.affine, grid.affine)
    ijk[:3, 3] += 0.25  # not on the image's voxels: refused as before
    slicerio.write_segmentation(str(tmp_path / "off.seg.nrrd"), {**seg, "ijkToLPS": ijk})
    with pytest.raises(InputError, match=r"off.seg.nrrd: label shape \(3, 2, 2\) differs from image shape"):
        load_label(tmp_path / "off.seg.nrrd", (7, 6, 5), reference=grid)
