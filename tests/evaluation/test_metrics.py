from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import save, synthetic_case
from sparseseg.errors import InputError
from sparseseg.evaluation.metrics import evaluate, format_table, mask_metrics

SHAPE = (10, 10, 10)


def _mask(*voxels):
    m = np.zeros(SHAPE, bool)
    for v in voxels:
        m[v] = True
    return m


def test_known_answers():
    cube = np.zeros(SHAPE, bool)
    cube[2:6, 2:6, 2:6] = True
    assert mask_metrics(cube, cube, (1, 1, 1)) == {"dice": 1.0, "hd95": 0.0, "status": "ok"}
    far = np.zeros(SHAPE, bool)
    far[7:9, 7:9, 7:9] = True
    disjoint = mask_metrics(far, cube, (1, 1, 1))
    assert disjoint["dice"] == 0.0 and disjoint["status"] == "ok" and disjoint["hd95"] > 0
    half = cube.copy()
    half[4:6] = False  # 32 of 64 voxels: Dice = 2 * 32 / 96
    assert mask_metrics(half, cube, (1, 1, 1))["dice"] == pytest.approx(2 / 3)


def test_hd95_is_spacing_aware():
    a, b = _mask((2, 2, 2)), _mask((2, 2, 6))
    assert mask_metrics(a, b, (1.0, 1.0, 2.5))["hd95"] == pytest.approx(10.0)
    assert mask_metrics(a, b, (1.0, 1.0, 1.0))["hd95"] == pytest.approx(4.0)


def test_empty_masks_are_explicit():
    empty, full = _mask(), _mask((1, 1, 1))
    assert mask_metrics(empty, empty, (1, 1, 1)) == {"dice": None, "hd95": None, "status": "both_empty"}
    assert mask_metrics(empty, full, (1, 1, 1)) == {"dice": 0.0, "hd95": None, "status": "prediction_empty"}
    assert mask_metrics(full, empty, (1, 1, 1)) == {"dice": 0.0, "hd95": None, "status": "reference_empty"}


def test_evaluate_folders(tmp_path, msd_dataset):
    _, ref_a = synthetic_case((16, 16, 16), seed=0)
    _, ref_b = synthetic_case((16, 16, 16), seed=1)
    pred_b = ref_b.copy()
    pred_b[pred_b == 2] = 1  # class 2 missed in case b
    save(ref_a, tmp_path / "ref" / "a.nii.gz")
    save(ref_b, tmp_path / "ref" / "b.nii.gz")
    save(ref_a, tmp_path / "pred" / "a.nii.gz")
    save(pred_b, tmp_path / "pred" / "b.nii.gz")
    out = tmp_path / "metrics.json"
    res = evaluate(tmp_path / "pred", tmp_path / "ref", out, dataset=msd_dataset)
    assert json.loads(out.read_text()) == res
    assert res["classes"] == ["ball", "core"] and res["num_cases"] == 2 and res["label_mode"] == "classes"
    core = res["per_class"]["core"]
    assert core["dice_mean"] == pytest.approx(0.5) and core["n_dice"] == 2
    assert core["hd95_mean"] == 0.0 and core["n_hd95"] == 1  # the missed case has no HD95
    assert core["status_counts"] == {"ok": 1, "prediction_empty": 1, "reference_empty": 0, "both_empty": 0}
    assert res["cases"][1]["metrics"]["core"] == {"dice": 0.0, "hd95": None, "status": "prediction_empty"}
    assert res["per_class"]["ball"]["dice_mean"] < 1.0
    assert res["mean"]["dice"] == pytest.approx(np.mean([res["per_class"][c]["dice_mean"] for c in res["classes"]]))
    table = format_table(res)
    assert "core" in table and "0.5000 ± 0.5000 (2)" in table and "2 case(s)" in table
    # Without a dataset the classes are the label values found.
    assert evaluate(tmp_path / "pred", tmp_path / "ref")["classes"] == ["1", "2"]


def test_evaluate_regions(tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:8, 2:8, 2:8] = 1
    labels[3:7, 3:7, 3:7] = 2
    labels[4:6, 4:6, 4:6] = 3
    save(labels, tmp_path / "ref" / "x.nii.gz")
    save(np.where(labels == 3, 2, labels).astype(np.uint8), tmp_path / "pred" / "x.nii.gz")  # ET missed
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"modality": {"0": "FLAIR"}, "training": [], "labels": {
        "0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}))
    res = evaluate(tmp_path / "pred", tmp_path / "ref", dataset=ds, label_mode="regions")
    assert res["classes"] == ["TC", "WT", "ET"] and res["label_mode"] == "regions"
    m = res["cases"][0]["metrics"]
    assert m["TC"]["dice"] == 1.0 and m["WT"]["dice"] == 1.0 and m["ET"]["status"] == "prediction_empty"


def test_evaluate_bad_inputs(tmp_path):
    save(np.zeros(SHAPE, np.uint8), tmp_path / "pred" / "a.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="a.nii.gz: no reference label map a in"):
        evaluate(tmp_path / "pred", tmp_path / "empty")
    with pytest.raises(InputError, match="nowhere: label folder not found"):
        evaluate(tmp_path / "pred", tmp_path / "nowhere")
    save(np.zeros((10, 10, 9), np.uint8), tmp_path / "ref" / "a.nii.gz")
    with pytest.raises(InputError, match=r"pred/a.nii.gz: label shape \(10, 10, 10\) differs"):
        evaluate(tmp_path / "pred", tmp_path / "ref")
    with pytest.raises(InputError, match="no predicted label maps found"):
        evaluate(tmp_path / "empty", tmp_path / "ref")
