from __future__ import annotations

import json

import pytest

from conftest import write_msd_dataset
from sparseseg.data.datasets import BRATS_REGIONS, load_dataset, split_cases
from sparseseg.errors import InputError


def test_msd_dataset(msd_dataset):
    ds = load_dataset(msd_dataset.parent)  # the folder works as well as the file
    assert ds.format == "msd" and ds.modality == "CT" and ds.channels == ["CT"]
    assert ds.labels == {0: "background", 1: "ball", 2: "core"}
    assert [c.name for c in ds.training] == ["case_000", "case_001", "case_002", "case_003"]
    case = ds.training[0]
    assert case.images[0].is_absolute() and case.images[0].is_file() and case.label.is_file()
    assert [c.name for c in ds.test] == ["case_004"] and ds.test[0].label is None
    assert ds.default_regions() == {}


def test_nnunet_dataset(nnunet_dataset):
    ds = load_dataset(nnunet_dataset)
    assert ds.format == "nnunet" and ds.modality == "MRI" and ds.channels == ["T1", "T2"]
    assert [c.name for c in ds.training] == ["case0", "case1", "case2"]
    assert [p.name for p in ds.training[1].images] == ["case1_0000.nii.gz", "case1_0001.nii.gz"]
    assert ds.training[1].label.name == "case1.nii.gz"


def test_nnunet_region_labels(nnunet_dataset):
    meta = json.loads(nnunet_dataset.read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": [2]}
    meta["regions_class_order"] = [1, 2]
    nnunet_dataset.write_text(json.dumps(meta))
    ds = load_dataset(nnunet_dataset)
    assert ds.regions == {"whole": [1, 2], "core": [2]} and sorted(ds.labels) == [0, 1, 2]


def test_brats_regions_detected(tmp_path):
    path = write_msd_dataset(tmp_path, num_cases=1, num_test=0)
    meta = json.loads(path.read_text())
    meta["labels"] = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    path.write_text(json.dumps(meta))
    assert load_dataset(path).default_regions() == BRATS_REGIONS == {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}


def _edit(path, **changes):
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"training": []}, "the training list is empty"),
        ({"labels": {"0": "background", "2": "x"}}, "consecutive"),
        ({"training": [{"image": "./imagesTr/case_000.nii.gz"}]}, "has no 'label'"),
        ({"modality": "CT"}, "'modality' must be"),
    ],
)
def test_bad_msd_json(msd_dataset, change, message):
    _edit(msd_dataset, **change)
    with pytest.raises(InputError, match=message) as err:
        load_dataset(msd_dataset)
    assert str(msd_dataset) in str(err.value)


def test_missing_file_and_duplicates(msd_dataset):
    meta = json.loads(msd_dataset.read_text())
    meta["training"].append(dict(meta["training"][0]))
    msd_dataset.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="listed twice"):
        load_dataset(msd_dataset)
    meta["training"][-1] = {"image": "./imagesTr/gone.nii.gz", "label": "./labelsTr/gone.nii.gz"}
    msd_dataset.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="gone.nii.gz: file of case 'gone'"):
        load_dataset(msd_dataset)
    msd_dataset.write_text("{not json")
    with pytest.raises(InputError, match="not a valid JSON"):
        load_dataset(msd_dataset)
    with pytest.raises(InputError, match="dataset.json not found"):
        load_dataset(msd_dataset.parent / "nowhere")


def test_bad_nnunet_layout(nnunet_dataset):
    (nnunet_dataset.parent / "imagesTr" / "case1_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case 'case1' lacks channel file\(s\) \[1\]"):
        load_dataset(nnunet_dataset)
    (nnunet_dataset.parent / "imagesTr" / "case1_0000.nii.gz").unlink()
    with pytest.raises(InputError, match="numTraining is 3 but imagesTr holds 2"):
        load_dataset(nnunet_dataset)
    _edit(nnunet_dataset, numTraining=2)
    (nnunet_dataset.parent / "labelsTr" / "case2.nii.gz").unlink()
    with pytest.raises(InputError, match="case2.nii.gz: file of case 'case2'"):
        load_dataset(nnunet_dataset)


def test_seeded_kfold_split(tmp_path):
    ds = load_dataset(write_msd_dataset(tmp_path, num_cases=7, shape=(8, 8, 8), num_test=0))
    names = {c.name for c in ds.training}
    vals = []
    for fold in range(5):
        train, val = split_cases(ds, fold, 5, seed=3)
        assert {c.name for c in train} | {c.name for c in val} == names
        assert not {c.name for c in train} & {c.name for c in val} and val
        vals.append([c.name for c in val])
        assert [c.name for c in split_cases(ds, fold, 5, seed=3)[1]] == vals[-1]  # deterministic
    assert sorted(n for v in vals for n in v) == sorted(names)  # every case validated exactly once
    assert [[c.name for c in split_cases(ds, f, 5, seed=4)[1]] for f in range(5)] != vals
    with pytest.raises(InputError, match="fold 5 out of range"):
        split_cases(ds, 5, 5)


def test_split_uses_given_validation_and_single_case(tmp_path):
    path = write_msd_dataset(tmp_path / "a", num_cases=3, shape=(8, 8, 8), num_test=0)
    meta = json.loads(path.read_text())
    meta["validation"] = [meta["training"].pop()]
    path.write_text(json.dumps(meta))
    train, val = split_cases(load_dataset(path), fold=0)
    assert [c.name for c in val] == ["case_002"] and len(train) == 2
    single = load_dataset(write_msd_dataset(tmp_path / "b", num_cases=1, shape=(8, 8, 8), num_test=0))
    assert split_cases(single) == (single.training, [])
