"""worker.evaluation by task: output structures, the task decision, segmentation metrics exact on
hand-made logits, the mean-IoU verdict, the output change and the reference buffers."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch
from torch import nn

from recalib.contract import Metrics, Verdict
from recalib.errors import InvalidDataError, InvalidModelError, InvalidOptionError
from worker.evaluation import Evaluation, ReferenceBuffers, evaluate, judge, resolve_task
from worker.evaluation.label_free import OutputChangeAccumulator
from worker.evaluation.outputs import auto_logits, describe, select
from worker.evaluation.segmentation import SegmentationAccumulator, fit_to_masks

Outputs = namedtuple("Outputs", ["logits", "aux"])


def test_select_by_key_index_field_and_dotted_path() -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert select({"out": a, "aux": b}, "aux") is b
    assert select((a, b), "1") is b and select(Outputs(a, b), "logits") is a
    assert select({"heads": [a, {"cls": b}]}, "heads.1.cls") is b
    assert select({"a.b": a}, "a.b") is a  # a key with a dot is taken whole first


@pytest.mark.parametrize(
    ("output", "key", "match"),
    [
        ({"out": torch.zeros(2, 3), "aux": None}, "logits", r"keys there are \['out', 'aux'\]"),
        (Outputs(torch.zeros(2), None), "scores", r"keys there are \['logits', 'aux'\]"),
        ((torch.zeros(2),), "3", r"keys there are \['0'\]"),
        ({"heads": [torch.zeros(2)]}, "heads.2", r"at 'heads' .* keys there are \['0'\]"),
        (torch.zeros(2, 3), "out", r"the output there is 2×3, which has no keys"),
    ],
)
def test_a_missing_output_key_lists_what_exists(output, key, match) -> None:
    with pytest.raises(InvalidOptionError, match=match) as info:
        select(output, key)
    assert info.value.field == "options.output_key"


def test_auto_logits() -> None:
    x = torch.zeros(2, 3)
    assert auto_logits(x) == (x, None)
    assert auto_logits({"aux": x, "out": x})[1] == "out"
    assert auto_logits(Outputs(x, None))[1] == "logits"
    assert auto_logits({"scores": x})[1] == "scores"  # a dict's only entry
    assert auto_logits({"embedding": x, "parts": (x,)}) == (None, None)
    assert auto_logits((x, x))[1] == "0"
    assert auto_logits([{"boxes": x}]) == (None, None)
    assert describe([{"boxes": torch.zeros(3, 4)}]) == "list[1] of dict(boxes: 3×4)"


@pytest.mark.parametrize(
    ("output", "labels", "task", "key"),
    [
        (torch.zeros(2, 5), "class", "classification", None),
        (torch.zeros(2, 5), None, "classification", None),
        ({"out": torch.zeros(2, 5, 4, 4)}, "mask", "segmentation", "out"),
        ({"out": torch.zeros(2, 5, 4, 4)}, None, "segmentation", "out"),
        (torch.zeros(2, 7), None, "classification", None),
        (torch.zeros(2, 7, 3), None, "none", None),
        ([{"boxes": torch.zeros(3, 4)}], None, "none", None),
    ],
)
def test_auto_decides_from_output_and_labels(output, labels, task, key) -> None:
    plan = resolve_task(output, requested="auto", output_key=None, labels=labels, batch=2)
    assert (plan.task, plan.output_key, plan.reason.startswith("auto")) == (task, key, True)


@pytest.mark.parametrize(
    ("output", "requested", "labels", "error", "match"),
    [
        (torch.zeros(2, 5), "auto", "mask", InvalidModelError, r"shape \(2, 5\)"),
        (torch.zeros(2, 5, 4, 4), "auto", "class", InvalidModelError, r"shape \(2, 5, 4, 4\)"),
        (torch.zeros(2, 10, 1), "auto", "class", InvalidModelError, r"shape \(2, 10, 1\)"),
        ({"a": torch.zeros(2), "b": 1}, "auto", "class", InvalidModelError, r"keys: \['a', 'b'\]"),
        (torch.zeros(2, 5), "segmentation", None, InvalidModelError, r"\(batch, classes, H, W\)"),
        (torch.zeros(2, 5, 4, 4), "segmentation", "class", InvalidDataError, "masks as labels"),
        (torch.zeros(3, 5), "classification", None, InvalidModelError, "for a batch of 2"),
    ],
)
def test_outputs_that_do_not_fit_the_task(output, requested, labels, error, match) -> None:
    with pytest.raises(error, match=match):
        resolve_task(output, requested=requested, output_key=None, labels=labels, batch=2)


def test_output_key_that_selects_no_tensor() -> None:
    with pytest.raises(InvalidOptionError, match=r"selects list\[1\] of 2×3, not a tensor"):
        resolve_task(
            {"heads": [torch.zeros(2, 3)]},
            requested="auto",
            output_key="heads",
            labels=None,
            batch=2,
        )


class _Seg(nn.Module):
    """Returns the batch itself as logits under ``out`` (inputs are hand-made logits)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x}


def _seg_eval(logits: torch.Tensor, masks: torch.Tensor, **kwargs):
    output = _Seg()(logits)
    plan = resolve_task(output, requested="auto", output_key=None, labels="mask", batch=len(masks))
    return evaluate(_Seg(), [(logits, masks)], labeled=True, plan=plan, **kwargs)


def test_segmentation_metrics_exact() -> None:
    # one 2×2 image, 3 classes; predictions [[0, 1], [1, 2]], labels [[0, 1], [2, 255]]
    predicted = torch.tensor([[0, 1], [1, 2]])
    logits = nn.functional.one_hot(predicted, 3).permute(2, 0, 1)[None].float() * math.log(8.0)
    masks = torch.tensor([[[0, 1], [2, 255]]])
    metrics = _seg_eval(logits, masks).metrics
    # class 0: TP 1, union 1 → 1; class 1: TP 1, FP 1 (pixel (1,0)) → 1/2; class 2: FN 1 → 0
    assert metrics.per_class_iou == pytest.approx([1.0, 0.5, 0.0])
    assert metrics.mean_iou == pytest.approx(0.5) and metrics.pixel_accuracy == pytest.approx(2 / 3)
    assert metrics.pixels == 3 and metrics.samples == 1 and metrics.top1 is None
    # softmax of [ln 8, 0, 0] is [.8, .1, .1] at every pixel (the ignored one too)
    assert metrics.mean_confidence == pytest.approx(0.8)
    assert metrics.loss == pytest.approx(-(2 * math.log(0.8) + math.log(0.1)) / 3)


def test_a_class_absent_everywhere_has_no_iou() -> None:
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 0] = 1.0  # predicts 0 everywhere
    metrics = _seg_eval(logits, torch.tensor([[[0, 0]]])).metrics
    assert metrics.per_class_iou == [1.0, None, None] and metrics.mean_iou == 1.0


def test_smaller_logits_are_upsampled_larger_refused() -> None:
    logits = torch.randn(2, 3, 4, 4)
    assert fit_to_masks(logits, (8, 8)).shape == (2, 3, 8, 8)
    assert fit_to_masks(logits, (4, 4)) is logits
    with pytest.raises(InvalidDataError, match=r"4×4 pixels, larger than the 2×2 masks"):
        fit_to_masks(logits, (2, 2))


def test_mask_values_outside_the_classes_fail_the_batch() -> None:
    with pytest.raises(InvalidDataError, match=r"mask value 5 is outside the model's 3 classes"):
        _seg_eval(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 5]]]))


def _iou_evaluation(hits_per_class: int, images: int = 40) -> Evaluation:
    """``images`` images of two classes, 50 labeled and 50 predicted pixels per class each, of
    which ``hits_per_class`` hit: IoU = hits / (100 − hits) per class and image."""
    counts = torch.tensor([[[50, 50], [50, 50], [hits_per_class] * 2]] * images)
    iou = hits_per_class / (100 - hits_per_class)
    metrics = Metrics(samples=images, mean_iou=iou)
    return Evaluation(metrics=metrics, predictions=None, image_counts=counts)


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [(25, 45, Verdict.better), (45, 25, Verdict.worse), (30, 30, Verdict.unchanged)],
)
def test_segmentation_verdict_by_paired_bootstrap(before, after, verdict) -> None:
    judgement = judge(_iou_evaluation(before), _iou_evaluation(after))
    assert judgement.verdict is verdict
    assert judgement.significance is not None
    assert judgement.significance.test == "paired_bootstrap"
    assert judgement.significance.samples == 40
    interval = judgement.after.mean_iou_interval  # identical images: no spread
    assert interval is not None
    assert interval.low == pytest.approx(after / (100 - after))
    assert interval.high == pytest.approx(after / (100 - after))


def test_mean_iou_bootstrap_is_seeded_and_varies_with_the_images() -> None:
    def mixed(hits: list[int]) -> Evaluation:
        counts = torch.tensor([[[50, 50], [50, 50], [h, h]] for h in hits])
        return Evaluation(metrics=Metrics(samples=len(hits), mean_iou=0.5), predictions=None,
                          image_counts=counts)  # fmt: skip

    before, after = mixed([20, 30, 40] * 5), mixed([21, 30, 41] * 5)
    first, second = judge(before, after), judge(before, after)
    assert first.significance == second.significance
    assert first.after.mean_iou_interval == second.after.mean_iou_interval
    interval = first.after.mean_iou_interval
    assert interval is not None and interval.low < interval.high


def test_image_counts_sum_to_the_confusion_matrix() -> None:
    accumulator = SegmentationAccumulator(labeled=True, ignore_index=255)
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 0], logits[0, 1, 0, 0] = 1.0, 2.0  # image 0: class 0, one pixel class 1
    logits[1, 2] = 1.0  # image 1: class 2 everywhere
    masks = torch.tensor([[[0, 0], [0, 255]], [[2, 1], [2, 2]]])
    accumulator.update(logits, masks)
    counts = accumulator.result().image_counts
    assert counts is not None
    assert counts.tolist() == [
        [[3, 0, 0], [2, 1, 0], [2, 0, 0]],  # labeled, predicted, hits (255 left out)
        [[0, 1, 3], [0, 0, 4], [0, 0, 3]],
    ]


def test_verdict_unknown_without_top1_or_mean_iou() -> None:
    empty = Evaluation(metrics=Metrics(samples=3), predictions=None)
    assert judge(empty, empty).verdict is Verdict.unknown


def test_output_change_exact_and_shape_changes_counted() -> None:
    change = OutputChangeAccumulator()
    change.update({"a": torch.tensor([3.0, 4.0])}, {"a": torch.tensor([3.0, 4.5])})
    change.update([torch.zeros(2, 4)], [torch.zeros(3, 4)])  # a detector found another box
    change.update({"ids": torch.tensor([1, 2])}, {"ids": torch.tensor([2, 2])})  # ints: ignored
    result = change.result()
    assert result.relative_l2 == pytest.approx(0.5 / 5.0)
    assert (result.tensors, result.shape_changed) == (1, 1)


def test_reference_buffers_run_the_old_statistics_and_restore_the_new() -> None:
    bn = nn.BatchNorm1d(2).eval()
    reference = ReferenceBuffers(bn)
    bn.running_mean.fill_(1.0)
    x = torch.ones(3, 2)
    with reference.active(bn):
        assert torch.equal(bn(x), x / math.sqrt(1 + bn.eps))
    assert torch.equal(bn.running_mean, torch.ones(2))
    with pytest.raises(RuntimeError), reference.active(bn):
        raise RuntimeError("boom")
    assert torch.equal(bn.running_mean, torch.ones(2))
