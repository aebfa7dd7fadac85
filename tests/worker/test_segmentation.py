"""Segmentation end to end on real data: digits masks, a BN encoder–decoder, a shifted domain.

The references are computed here, without recalib's evaluation: the oracle model carries the
pooled BN statistics torch's own BN layers see (tests/bn_oracle.py), and mean IoU / pixel accuracy
are counted with NumPy (seg_digits.seg_iou). A job's ``after`` numbers must equal the oracle's;
its checkpoint must carry the oracle's statistics.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recalib.contract import JobOptions, JobSpec, Progress, Verdict
from recalib.errors import InvalidDataError, InvalidOptionError
from tests.bn_oracle import (
    assert_statistics_equal,
    calibration_order,
    pooled_bn_statistics,
    with_statistics,
)
from tests.worker.seg_digits import (
    SEG_CLASSES,
    make_seg_case,
    mask_archive,
    png,
    predict,
    quantized,
    seg_iou,
    write_seg_files,
)
from worker.pipeline import run_job

PIXEL = 1.0 / (360 * 64)  # one pixel of the evaluation split's accuracy, about


@pytest.fixture(scope="module")
def seg_case():
    return make_seg_case(seed=0)


@pytest.fixture(scope="module")
def seg_files(seg_case, tmp_path_factory) -> dict[str, Path]:
    return write_seg_files(seg_case, tmp_path_factory.mktemp("seg"))


def _spec(files, out_dir: Path, *, model: str = "model", eval_file: bool = True, **options):
    return JobSpec(
        model_path=str(files[model]),
        calibration_path=str(files["calibration"]),
        eval_path=str(files["evaluation"]) if eval_file else None,
        out_dir=str(out_dir),
        options=JobOptions(**options),
    )


def _oracle(seg_case, files, options: JobOptions | None = None):
    options = options or JobOptions()
    order = calibration_order(files["calibration"], files["evaluation"], options)
    inputs = torch.from_numpy(seg_case.calibration[0])
    statistics = pooled_bn_statistics(seg_case.model, inputs, order, options.batch_size)
    return with_statistics(seg_case.model, statistics), statistics


@pytest.mark.slow
@pytest.mark.parametrize("model", ["model", "torchscript"])
def test_mean_iou_before_and_after_match_the_bn_oracle(seg_case, seg_files, tmp_path, model):
    report = run_job(_spec(seg_files, tmp_path, model=model))
    oracle, statistics = _oracle(seg_case, seg_files)
    x, masks = seg_case.evaluation
    source_accuracy, source_miou, _ = seg_iou(predict(seg_case.model, x), masks)
    oracle_accuracy, oracle_miou, oracle_ious = seg_iou(predict(oracle, x), masks)

    assert report.task is not None and report.task.task == "segmentation"
    assert report.task.output_key == "out" and report.task.requested == "auto"
    assert "masks" in report.task.reason and report.task.output.startswith("dict(out: 2×11×8×8")
    before, after = report.before, report.after
    assert before.top1 is None and before.pixels == after.pixels == masks.size
    assert before.pixel_accuracy == pytest.approx(source_accuracy, abs=2 * PIXEL)
    assert before.mean_iou == pytest.approx(source_miou, abs=2e-3)
    assert after.pixel_accuracy == pytest.approx(oracle_accuracy, abs=2 * PIXEL)
    assert after.mean_iou == pytest.approx(oracle_miou, abs=2e-3)
    assert len(after.per_class_iou) == SEG_CLASSES
    for got, want in zip(after.per_class_iou, oracle_ious, strict=True):
        assert (got is None) == (want is None) and (want is None or abs(got - want) < 5e-3)
    expected = Verdict.better if oracle_miou > source_miou + 1e-3 else Verdict.worse
    assert report.verdict is expected
    assert 0 < report.prediction_change <= 1 and report.output_change is None
    saved = out_model(tmp_path, report, model)
    assert_statistics_equal(saved, statistics)
    page = (tmp_path / "report.html").read_text()
    assert f"mean IoU {before.mean_iou:.4f} → {after.mean_iou:.4f}" in page
    assert "<h2>IoU per class</h2>" in page and 'id="task">segmentation' in page


def out_model(out_dir: Path, report, model: str) -> torch.nn.Module:
    path = out_dir / report.checkpoint.file
    if model == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(path).module()


@pytest.mark.slow
def test_smaller_logits_are_upsampled_to_the_masks(seg_case, seg_files, tmp_path) -> None:
    report = run_job(_spec(seg_files, tmp_path, output_key="aux"))
    oracle, _ = _oracle(seg_case, seg_files)
    x, masks = seg_case.evaluation
    accuracy, miou, _ = seg_iou(predict(oracle, x, key="aux"), masks)
    assert report.task.output_key == "aux" and report.task.task == "segmentation"
    assert report.after.pixel_accuracy == pytest.approx(accuracy, abs=2 * PIXEL)
    assert report.after.mean_iou == pytest.approx(miou, abs=2e-3)


@pytest.mark.slow
def test_unlabeled_segmentation_is_label_free(seg_case, seg_files, tmp_path) -> None:
    x = seg_case.calibration[0]
    np.savez(tmp_path / "unlabeled.npz", inputs=x)
    files = {**seg_files, "calibration": tmp_path / "unlabeled.npz"}
    report = run_job(_spec(files, tmp_path / "out", eval_file=False))
    assert report.task.task == "segmentation" and "no labels" in report.task.reason
    assert report.verdict is Verdict.unknown and report.after.mean_iou is None
    oracle, _ = _oracle(seg_case, files)
    source_pixels, oracle_pixels = predict(seg_case.model, x), predict(oracle, x)
    assert report.prediction_change == pytest.approx(
        float((source_pixels != oracle_pixels).mean()), abs=3 * PIXEL
    )
    with torch.no_grad():
        a, b = seg_case.model(torch.from_numpy(x)), oracle(torch.from_numpy(x))
    diff = sum(float((b[k].double() - a[k].double()).square().sum()) for k in ("out", "aux"))
    norm = sum(float(a[k].double().square().sum()) for k in ("out", "aux"))
    change = report.output_change
    assert change is not None and change.tensors == 2 * 2 and change.shape_changed == 0
    assert change.relative_l2 == pytest.approx((diff / norm) ** 0.5, rel=1e-3)


def test_ignore_index_pixels_count_nowhere(seg_case, seg_files, tmp_path) -> None:
    x, masks = (a[:40] for a in seg_case.evaluation)
    masks = masks.copy()
    masks[:, :2, :] = 7  # class 7 where the model sees background ...
    masks[:, 0, :] = 200  # ... and an ignored row
    np.savez(tmp_path / "e.npz", inputs=x, labels=masks)
    files = {**seg_files, "evaluation": tmp_path / "e.npz"}
    report = run_job(_spec(files, tmp_path / "out", ignore_index=200, max_samples=64))
    assert report.after.pixels == masks.size - 40 * 8
    oracle, _ = _oracle(seg_case, files, JobOptions(max_samples=64))
    accuracy, miou, _ = seg_iou(predict(oracle, x), masks, ignore=200)
    assert report.after.pixel_accuracy == pytest.approx(accuracy, abs=2 / (40 * 56))
    assert report.after.mean_iou == pytest.approx(miou, abs=2e-3)


@pytest.mark.slow
def test_image_archive_with_masks_equals_the_same_tensors(seg_case, seg_files, tmp_path) -> None:
    (cx, cm), (ex, em) = (
        tuple(a[:120] for a in split) for split in (seg_case.calibration, seg_case.evaluation)
    )
    mask_archive(tmp_path / "calib.zip", cx, cm)
    mask_archive(tmp_path / "eval.zip", ex, em)
    np.savez(tmp_path / "calib.npz", inputs=quantized(cx), labels=cm)
    np.savez(tmp_path / "eval.npz", inputs=quantized(ex), labels=em)
    preprocess = {"mode": "L"}
    zipped = {
        **seg_files,
        "calibration": tmp_path / "calib.zip",
        "evaluation": tmp_path / "eval.zip",
    }
    arrays = {
        **seg_files,
        "calibration": tmp_path / "calib.npz",
        "evaluation": tmp_path / "eval.npz",
    }
    from_zip = run_job(_spec(zipped, tmp_path / "zip", preprocess=preprocess))
    from_npz = run_job(_spec(arrays, tmp_path / "npz"))
    assert from_zip.task.task == "segmentation"
    assert from_zip.before == from_npz.before and from_zip.after == from_npz.after
    assert from_zip.after.pixels == em.size


def test_archive_masks_are_resized_nearest_and_cropped_like_the_images(seg_case, tmp_path):
    from worker.formats.data import open_samples

    x, masks = (a[:6] for a in seg_case.evaluation)
    path = mask_archive(tmp_path / "seg.zip", x, masks)
    samples = open_samples(
        path,
        preprocess=JobOptions(preprocess={"mode": "L", "resize": 20, "center_crop": 16}).preprocess,
    )
    inputs, labels = samples.get_batch(range(6))
    assert samples.label_kind == "mask" and inputs.shape == (6, 1, 16, 16)
    assert labels.shape == (6, 16, 16) and labels.dtype == torch.int64
    for i in range(6):
        expected = Image.fromarray(masks[i]).resize((20, 20), Image.Resampling.NEAREST)
        expected = np.asarray(expected)[2:18, 2:18]
        assert np.array_equal(labels[i].numpy(), expected)


# --- bad input: a clear error naming the file or option, before any recalibration runs ---


def _refused(spec: JobSpec, error: type[Exception], match: str) -> Exception:
    events: list[Progress] = []
    with pytest.raises(error, match=match) as info:
        run_job(spec, on_progress=events.append)
    assert {event.phase.value for event in events} <= {"loading"}
    assert not list(Path(spec.out_dir).glob("*.recalibrated*"))
    return info.value


def test_masks_of_another_size_than_the_images_tensor_file(seg_case, seg_files, tmp_path):
    x, masks = seg_case.evaluation
    np.savez(tmp_path / "bad.npz", inputs=x, labels=masks[:, :7, :7])
    files = {**seg_files, "evaluation": tmp_path / "bad.npz"}
    error = _refused(_spec(files, tmp_path / "out"), InvalidDataError, r"bad\.npz.*7×7.*8×8")
    assert error.file == str(tmp_path / "bad.npz")


def test_masks_of_another_size_than_the_imagesmask_archive(seg_case, seg_files, tmp_path):
    x, masks = (a[:8] for a in seg_case.evaluation)
    wide = png(np.zeros((8, 9), np.uint8), "L")
    path = mask_archive(tmp_path / "bad.zip", x, masks, **{"data/masks/003.png": wide})
    files = {**seg_files, "evaluation": path}
    spec = _spec(files, tmp_path / "out", preprocess={"mode": "L"})
    _refused(spec, InvalidDataError, r"bad\.zip: mask data/masks/003\.png is 9×8 .* 8×8")


def test_an_image_without_its_mask_is_named(seg_case, seg_files, tmp_path):
    x, masks = (a[:4] for a in seg_case.evaluation)
    path = mask_archive(
        tmp_path / "bad.zip",
        x,
        masks,
        **{"data/images/extra.png": png(np.zeros((8, 8), np.uint8), "L")},
    )
    files = {**seg_files, "evaluation": path}
    spec = _spec(files, tmp_path / "out", preprocess={"mode": "L"})
    _refused(spec, InvalidDataError, r"data/images/extra\.png has no mask masks/extra\.png")


def test_rgb_masks_are_refused(seg_case, seg_files, tmp_path):
    x, masks = (a[:4] for a in seg_case.evaluation)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    path = mask_archive(tmp_path / "bad.zip", x, masks, **{"data/masks/001.png": buffer.getvalue()})
    spec = _spec({**seg_files, "evaluation": path}, tmp_path / "out", preprocess={"mode": "L"})
    _refused(spec, InvalidDataError, r"mask data/masks/001\.png has mode RGB")


def test_class_ids_beyond_the_model_outputs(seg_case, seg_files, tmp_path):
    x, masks = seg_case.evaluation
    masks = masks.copy()
    masks[5, 3, 3] = SEG_CLASSES  # 11: one past the last class, and not ignore_index
    masks[6, 0, 0] = 255  # ignore_index: fine
    np.savez(tmp_path / "bad.npz", inputs=x, labels=masks)
    files = {**seg_files, "evaluation": tmp_path / "bad.npz"}
    error = _refused(
        _spec(files, tmp_path / "out"),
        InvalidDataError,
        r"bad\.npz: mask value 11 in sample 5 is outside the model's 11 classes "
        r".* ignore_index 255",
    )
    assert error.file == str(tmp_path / "bad.npz")


def test_an_output_key_that_does_not_exist_lists_the_keys(seg_files, tmp_path):
    error = _refused(
        _spec(seg_files, tmp_path / "out", output_key="logits"),
        InvalidOptionError,
        r"output_key 'logits' does not exist .* keys there are \['out', 'aux'\]",
    )
    assert error.field == "options.output_key"


def test_an_input_name_missing_from_the_file(seg_files, tmp_path):
    error = _refused(
        _spec(seg_files, tmp_path / "out", input_names=["image"]),
        InvalidDataError,
        r"calibration\.npz has no 'image' array, which options\.input_names \['image'\] lists "
        r"\(found: \['inputs', 'labels'\]\)",
    )
    assert error.file == str(seg_files["calibration"])


def test_classification_task_with_masks_is_refused(seg_files, tmp_path):
    _refused(
        _spec(seg_files, tmp_path / "out", task="classification"),
        InvalidDataError,
        r"task classification needs one class id per sample, but the labels are N×H×W masks",
    )
