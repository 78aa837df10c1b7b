"""common/reporting.py: training.log, metrics.csv, TensorBoard scalars and PNG plots."""
from __future__ import annotations

import csv
import logging
import sys

import pytest

from common import reporting as rep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {"epoch": 1, "train_loss": 0.9, "train_acc": 0.5, "val_loss": 0.8, "val_acc": 0.55,
     "lr": 1e-3, "samples_per_s": 100.0, "epoch_time": 2.0},
    {"epoch": 2, "train_loss": 0.5, "train_acc": 0.75, "val_loss": 0.6, "val_acc": 0.7,
     "lr": 5e-4, "samples_per_s": 120.0, "epoch_time": 1.5},
]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 2000  # a real picture, not an empty canvas stub
    from PIL import Image

    with Image.open(path) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if "tmp" in p.name]


def test_write_metrics_csv_rows_and_columns(tmp_path):
    path = tmp_path / "metrics.csv"
    history = [dict(HISTORY[0]), dict(HISTORY[1], val_top5=0.9), {"epoch": 3, "lr": 1 / 3}]
    rep.write_metrics_csv(history, path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert list(rows[0]) == list(HISTORY[0]) + ["val_top5"]  # first-seen order, union of keys
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["val_acc"] == "0.7"
    assert rows[1]["val_top5"] == "0.9" and rows[0]["val_top5"] == ""
    assert rows[2]["lr"] == "0.333333"  # six significant digits
    assert no_temp_files(tmp_path)


def test_write_metrics_csv_rewrites_the_whole_file(tmp_path):
    path = tmp_path / "metrics.csv"
    rep.write_metrics_csv(HISTORY, path)
    rep.write_metrics_csv(HISTORY[:1], path)  # a resumed run rewrites from its history
    with open(path, newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 1


def test_write_metrics_csv_empty_history_writes_nothing(tmp_path):
    rep.write_metrics_csv([], tmp_path / "metrics.csv")
    assert not (tmp_path / "metrics.csv").exists()


def test_plot_curves(tmp_path):
    path = tmp_path / "curves.png"
    rep.plot_curves(HISTORY, path)
    assert_png(path)
    assert no_temp_files(tmp_path)


def test_plot_curves_train_only_and_zero_lr(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "lr": 0.0 if e == 3 else 0.1} for e in (1, 2, 3)]
    path = tmp_path / "curves.png"
    rep.plot_curves(history, path)
    assert_png(path)


def test_plot_curves_empty_history(tmp_path):
    rep.plot_curves([], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("n", [3, 40])
def test_plot_confusion_matrix(tmp_path, n):
    matrix = [[(i == j) * 10 + (i + j) % 3 for j in range(n)] for i in range(n)]
    path = tmp_path / "confusion_matrix.png"
    rep.plot_confusion_matrix(matrix, [f"class{i}" for i in range(n)], path)
    assert_png(path)
    assert no_temp_files(tmp_path)


def test_format_epoch_contains_the_numbers():
    line = rep.format_epoch(dict(HISTORY[1], epoch=2), epochs=10, improved=True)
    assert line.startswith("epoch 2/10")
    assert "train loss 0.5000 acc 75.00%" in line
    assert "val loss 0.6000 acc 70.00%" in line
    assert "lr 5.00e-04" in line
    assert "120 img/s" in line and "1.5s" in line
    assert line.endswith("* best")
    plain = rep.format_epoch({"epoch": 1, "train_loss": 0.25, "lr": 0.1, "samples_per_s": 9.0,
                              "epoch_time": 0.2}, epochs=1, improved=False)
    assert "best" not in plain and "val" not in plain and "acc" not in plain
    assert "train loss 0.2500" in plain


def test_log_file_starts_only_when_attached_and_keeps_early_lines(tmp_path, capsys):
    try:
        logger = rep.setup_logging()
        logger.info("early line")
        assert list(tmp_path.iterdir()) == []  # nothing written before the inputs are checked
        rep.attach_log_file(tmp_path)
        logger.info("later line")
    finally:
        rep.close_logging()
    text = (tmp_path / "training.log").read_text(encoding="utf-8")
    assert text.index("early line") < text.index("later line")
    assert text.count("early line") == 1
    out = capsys.readouterr().out
    assert out.count("early line") == 1 and out.count("later line") == 1
    assert logging.getLogger(rep.LOGGER_NAME).handlers == []


def test_log_file_is_appended_on_resume(tmp_path):
    try:
        for run in ("first", "second"):
            logger = rep.setup_logging()
            rep.attach_log_file(tmp_path)
            logger.info(f"{run} run line")
            assert len(logger.handlers) == 2  # console + file, nothing left over
    finally:
        rep.close_logging()
    lines = (tmp_path / "training.log").read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["first run line", "second run line"]


def test_a_run_that_never_attaches_leaves_no_log(tmp_path):
    try:
        rep.setup_logging().info("error: bad input")
    finally:
        rep.close_logging()
    assert list(tmp_path.iterdir()) == []
    assert logging.getLogger(rep.LOGGER_NAME).handlers == []


def test_setup_logging_disabled_shows_only_errors(capsys):
    try:
        logger = rep.setup_logging(enabled=False)  # a non-zero rank
        logger.info("should not appear")
        logger.error("errors still do")
    finally:
        rep.close_logging()
    out = capsys.readouterr().out
    assert "should not appear" not in out and "errors still do" in out


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = rep.TensorBoard(tmp_path / "tb", log=lambda _: None)
    for record in HISTORY:
        board.scalars(record)
    board.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr"} <= tags
    loss = events.Scalars("val/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([0.8, 0.6])


def test_tensorboard_missing_is_a_notice(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    logged: list[str] = []
    board = rep.TensorBoard(tmp_path / "tb", log=logged.append)
    board.scalars(HISTORY[0])
    board.close()
    assert len(logged) == 1 and "pip install tensorboard" in logged[0]
    assert not (tmp_path / "tb").exists()


SEGMENTATION = {"epoch": 3, "train_loss": 0.61, "train_dice": 0.55, "train_iou": 0.4, "val_loss": 0.52,
                "val_dice": 0.71234, "val_iou": 0.5678, "lr": 1e-4, "samples_per_s": 1.26, "epoch_time": 80.0}


def test_format_epoch_shows_dice_and_iou_for_segmentation():
    line = rep.format_epoch(SEGMENTATION, epochs=5, improved=True)
    assert "train loss 0.6100 Dice 0.5500 |" in line  # train Dice; its IoU would only lengthen the line
    assert "val loss 0.5200 Dice 0.7123 IoU 0.5678 |" in line
    assert "acc" not in line
    assert "| 1.3 img/s |" in line and line.endswith("* best")


@pytest.mark.parametrize("rate, shown", [(0.254, "0.25"), (1.26, "1.3"), (9.94, "9.9"), (10.4, "10"),
                                         (120.0, "120"), (1234.6, "1235")])
def test_throughput_has_a_decimal_when_small(rate, shown):
    assert rep.format_rate(rate) == shown
    assert f"| {shown} img/s |" in rep.format_epoch(dict(SEGMENTATION, samples_per_s=rate), 5, False)
    assert rep.progress_fields({"loss": 0.5}, 1e-3, rate)["img/s"] == shown


def test_progress_bar_fields_and_title_for_segmentation():
    shown = rep.progress_fields({"loss": 0.61, "dice": 0.55, "iou": 0.4}, 1e-4, 1.26)
    assert shown == {"loss": "0.6100", "dice": "0.5500", "iou": "0.4000", "lr": "1.00e-04", "img/s": "1.3"}
    assert rep.progress_fields({"acc": 0.9}, 1e-3, 50)["acc"] == "90.00%"
    assert rep.progress_title(4, 5, [SEGMENTATION]) == "epoch 4/5 (last val Dice 0.7123 IoU 0.5678)"
    assert rep.progress_title(1, 5, []) == "epoch 1/5"
