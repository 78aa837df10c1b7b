"""common/data/timeseries.py: the three layouts, column handling, bad input, leak-free splits,
the train-only normaliser, windows for prediction and splits.json."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import timeseries as ts
from common.errors import UserError

CHANNELS = ["acc_x", "acc_y", "acc_z"]


# ---------------------------------------------------------------- generated recordings


def make_activity_recordings(rng: np.random.Generator, classes=("walk", "run", "sit"), per_class: int = 4,
                             channels: int = 3, min_len: int = 40, max_len: int = 60
                             ) -> list[tuple[str, np.ndarray]]:
    """(class, float32 (T, C)) recordings; class k oscillates at its own frequency and amplitude with its
    own noise level, so a small model can tell the classes apart."""
    recordings = []
    for k, name in enumerate(classes):
        freq, amp, noise = 0.03 + 0.07 * k, 0.5 + 1.5 * k, 0.05 * (k + 1)
        for _ in range(per_class):
            steps = np.arange(int(rng.integers(min_len, max_len + 1)))[:, None]
            phase = rng.uniform(0, 2 * np.pi, channels)
            wave = amp * np.sin(2 * np.pi * freq * steps + phase)
            recordings.append((name, (wave + noise * rng.standard_normal(wave.shape)).astype(np.float32)))
    return recordings


def write_csv(path: Path, header: list[str] | None, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def _cells(values: np.ndarray) -> list[list[str]]:
    return [[f"{v:.6f}" for v in row] for row in values]


def write_recordings(root: Path, recordings, header: bool = True, time: bool = False,
                     extra: dict[str, str] | None = None) -> list[Path]:
    """root/<class>/rec_<i>.csv, one file per recording."""
    paths, counts = [], {}
    for name, values in recordings:
        i = counts[name] = counts.get(name, -1) + 1
        names = [f"acc_{a}" for a in "xyz"][: values.shape[1]] if values.shape[1] <= 3 else \
            [f"c{j}" for j in range(values.shape[1])]
        rows = _cells(values)
        if time:
            names, rows = ["time", *names], [[str(t), *r] for t, r in enumerate(rows)]
        for col, cell in (extra or {}).items():
            names, rows = [*names, col], [[*r, cell] for r in rows]
        paths.append(write_csv(root / name / f"rec_{i:03d}.csv", names if header else None, rows))
    return paths


def write_long(path: Path, segments, group_column: str | None = "subject") -> Path:
    """One long CSV: segments are (group, label, (T, C) values); label may be a per-row list."""
    header = ([group_column] if group_column else []) + ["t", "label", *CHANNELS]
    rows = []
    for group, label, values in segments:
        labels = label if isinstance(label, list) else [label] * len(values)
        for t, (lab, row) in enumerate(zip(labels, _cells(values), strict=True)):
            rows.append(([group] if group_column else []) + [str(t), lab, *row])
    return write_csv(path, header, rows)


def error_of(fn, *args, **kwargs) -> str:
    """The UserError message, checked to be one line."""
    with pytest.raises(UserError) as err:
        fn(*args, **kwargs)
    text = str(err.value)
    assert "\n" not in text, text
    return text


def assert_no_leak(data: ts.SeriesData) -> None:
    seen: dict[str, str] = {}
    for name, split in data.splits.items():
        assert sorted(set(split.ids)) == data.split_ids[name]
        for rid in set(split.ids):
            assert seen.setdefault(rid, name) == name, f"{rid} is in {seen[rid]} and {name}"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def recordings_dir(tmp_path, rng) -> Path:
    """tmp/rec/<walk|run|sit>/rec_<i>.csv: 5 recordings per class, 40 to 60 steps, a time column."""
    write_recordings(tmp_path / "rec", make_activity_recordings(rng, per_class=5), time=True)
    return tmp_path / "rec"


# ---------------------------------------------------------------- the generator


def test_generated_classes_differ_in_amplitude_and_frequency(rng):
    recs = make_activity_recordings(rng, per_class=3, min_len=200, max_len=200)
    assert len(recs) == 9 and all(v.shape == (200, 3) and v.dtype == np.float32 for _, v in recs)
    spread = {name: np.mean([v.std() for n, v in recs if n == name]) for name in ("walk", "run", "sit")}
    assert spread["walk"] < spread["run"] < spread["sit"]
    crossings = {name: np.mean([(np.diff(np.sign(v[:, 0])) != 0).sum() for n, v in recs if n == name])
                 for name in ("walk", "run", "sit")}
    assert crossings["walk"] < crossings["run"] < crossings["sit"]


# ---------------------------------------------------------------- layout (a)


def test_per_recording_layout_windows_ids_and_random_split(recordings_dir):
    data = ts.load_series_data(recordings_dir)
    assert data.layout == "per-recording"
    assert data.classes == ["run", "sit", "walk"] and data.channels == CHANNELS
    lengths = [len(p.read_text().splitlines()) - 1 for p in sorted(recordings_dir.rglob("*.csv"))]
    assert data.window_size == int(np.median(lengths))
    assert set(data.splits) == {"train", "val", "test"}
    total = sum(len(s.ids) for s in data.splits.values())
    assert total == 15
    for split in data.splits.values():
        assert split.X.dtype == np.float32 and split.X.shape[1:] == (data.window_size, 3)
        assert split.y.dtype == np.int64 and len(split.y) == len(split.ids) == len(split.X)
        assert sorted(set(split.y.tolist())) == [0, 1, 2]  # every class in every split
    assert "walk/rec_003.csv" in {i for ids in data.split_ids.values() for i in ids}
    assert_no_leak(data)
    label_of = {i: data.classes[y] for s in data.splits.values() for i, y in zip(s.ids, s.y, strict=True)}
    assert all(rid.split("/")[0] == name for rid, name in label_of.items())
    assert data.options == {"label_column": "label", "time_column": None, "group_column": None,
                            "channels": CHANNELS, "window_size": data.window_size, "stride": None,
                            "fill_missing": None}
    json.dumps(data.options)  # plain types


def test_recording_values_are_read_in_order_with_centre_crop_and_end_padding(tmp_path):
    long_values = np.arange(30, dtype=np.float32).reshape(10, 3)
    short_values = np.ones((4, 3), np.float32)
    for name in ("a", "b", "c"):
        write_recordings(tmp_path / "d", [(name, long_values)] * 2 + [(name, short_values)])
    data = ts.load_series_data(tmp_path / "d", window_size=6, seed=1)
    windows = {rid: x for s in data.splits.values() for rid, x in zip(s.ids, s.X, strict=True)}
    np.testing.assert_array_equal(windows["a/rec_000.csv"], long_values[2:8])
    np.testing.assert_array_equal(windows["a/rec_002.csv"], np.vstack([short_values, np.zeros((2, 3))]))
    assert "6 of 9 recordings cropped (centre) to 6 steps" in data.notes
    assert "3 of 9 recordings zero-padded (at the end) to 6 steps" in data.notes


def test_recordings_of_different_lengths_note_the_median_window(recordings_dir):
    data = ts.load_series_data(recordings_dir)
    median_note = f"window_size {data.window_size}: the median recording length"
    assert any(n.startswith(median_note) for n in data.notes)
    assert any("recordings cropped (centre)" in n for n in data.notes)
    assert any("recordings zero-padded (at the end)" in n for n in data.notes)


def test_stride_cuts_long_recordings_into_windows_of_one_recording(tmp_path, rng):
    write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3, min_len=50, max_len=50))
    data = ts.load_series_data(tmp_path / "d", window_size=20, stride=10)
    assert sum(len(s.ids) for s in data.splits.values()) == 9 * 4  # starts 0, 10, 20, 30
    assert data.options["stride"] == 10
    assert_no_leak(data)


def test_split_folders_are_kept_and_ids_name_the_split(tmp_path, rng):
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        write_recordings(tmp_path / "d" / split, make_activity_recordings(rng, per_class=n))
    data = ts.load_series_data(tmp_path / "d")
    assert data.split_ids["val"] == ["val/run/rec_000.csv", "val/sit/rec_000.csv", "val/walk/rec_000.csv"]
    assert len(data.split_ids["train"]) == 9 and all(i.startswith("train/") for i in data.split_ids["train"])
    assert "splits from the folders train/, val/, test/" in data.notes
    assert_no_leak(data)


def test_without_test_folder_there_is_no_test_split_and_a_note(tmp_path, rng):
    for split in ("train", "val"):
        write_recordings(tmp_path / "d" / split, make_activity_recordings(rng, per_class=1))
    data = ts.load_series_data(tmp_path / "d")
    assert set(data.splits) == {"train", "val"} and set(data.split_ids) == {"train", "val"}
    assert "no test split: the final evaluation is on val" in data.notes


def test_bad_split_folders(tmp_path, rng):
    write_recordings(tmp_path / "d" / "train", make_activity_recordings(rng, per_class=1))
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert "has split folders (train) but no val/ folder" in text and str(tmp_path / "d") in text
    write_recordings(tmp_path / "d" / "val",
                     make_activity_recordings(rng, classes=("walk", "run"), per_class=1))
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert "class folders of train/ and val/ differ (only in train: sit; only in val: none)" in text
    write_recordings(tmp_path / "d" / "walk", make_activity_recordings(rng, classes=("walk",), per_class=1))
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert "mixes split folders (train, val) with other folders (walk)" in text


def test_files_without_header_get_positional_channel_names(tmp_path, rng):
    write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3), header=False)
    data = ts.load_series_data(tmp_path / "d")
    assert data.channels == ["ch0", "ch1", "ch2"]
    assert "9 files without a header row: channels named ch0, ch1, ..." in data.notes
    assert all(len(s.X) for s in data.splits.values())


def test_header_is_detected_when_one_column_name_is_numeric_looking(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = write_csv(tmp_path / "r.csv", ["acc_x", "2", "acc_z"], _cells(values))
    out, _ = ts.read_for_prediction(path, {"window_size": 4}, ["acc_x", "2", "acc_z"])
    np.testing.assert_array_equal(out[0], values)
    path = write_csv(tmp_path / "n.csv", None, _cells(values))
    out, _ = ts.read_for_prediction(path, {"window_size": 4}, ["ch0", "ch1", "ch2"])
    np.testing.assert_array_equal(out[0], values)  # no header: the first row is data


@pytest.mark.parametrize("name", ["t", "Time", "TIMESTAMP"])
def test_time_column_is_not_a_channel(tmp_path, rng, name):
    recs = make_activity_recordings(rng, per_class=3)
    for path in write_recordings(tmp_path / "d", recs, time=True):
        text = path.read_text().replace("time,", f"{name},", 1)
        path.write_text(text)
    data = ts.load_series_data(tmp_path / "d")
    assert data.channels == CHANNELS
    assert f"time column '{name}' is the time index, not a channel" in data.notes


def test_named_time_column_is_not_a_channel_and_must_exist(tmp_path, rng):
    write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3), extra={"ms": "5"})
    data = ts.load_series_data(tmp_path / "d", time_column="ms")
    assert data.channels == CHANNELS and data.options["time_column"] == "ms"
    text = error_of(ts.load_series_data, tmp_path / "d", time_column="millis")
    assert "has no time column 'millis'" in text and "acc_x, acc_y, acc_z, ms" in text
    assert "--time-column" in text


def test_non_numeric_columns_are_ignored_with_one_note(tmp_path, rng):
    paths = write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3),
                             extra={"subject": "anna", "date": "2024-05-01"})
    data = ts.load_series_data(tmp_path / "d")
    assert data.channels == CHANNELS
    ignored = [n for n in data.notes if n.startswith("ignored non-numeric columns")]
    assert ignored == [f"ignored non-numeric columns in {paths[3]} (and 8 more files): subject, date"]


def test_explicit_channels_pick_and_order_columns(tmp_path, rng):
    write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3))
    data = ts.load_series_data(tmp_path / "d", channels=["acc_z", "acc_x"])
    assert data.channels == ["acc_z", "acc_x"] and data.splits["train"].X.shape[2] == 2
    text = error_of(ts.load_series_data, tmp_path / "d", channels=["acc_x", "gyro_x"])
    assert "has no column 'gyro_x'; its columns are: acc_x, acc_y, acc_z" in text
    assert "rec_000.csv" in text and "--channels" in text


def test_stray_text_cell_names_file_line_and_column(tmp_path, rng):
    paths = write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3))
    lines = paths[4].read_text().splitlines()
    cells = lines[6].split(",")
    cells[1] = "oops"
    lines[6] = ",".join(cells)
    paths[4].write_text("\n".join(lines) + "\n")
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert text.startswith(f"{paths[4]} line 7, column 'acc_y': 'oops' is not a number")


def test_missing_cell_is_an_error_suggesting_fill_missing(tmp_path, rng):
    paths = write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3))
    lines = paths[0].read_text().splitlines()
    lines[3] = ",".join(["", *lines[3].split(",")[1:]])
    paths[0].write_text("\n".join(lines) + "\n")
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert f"{paths[0]} line 4, column 'acc_x': missing value" in text
    assert "--fill-missing ffill" in text and "--fill-missing zero" in text
    assert ts.load_series_data(tmp_path / "d", fill_missing="ffill").options["fill_missing"] == "ffill"
    assert "--fill-missing must be ffill or zero" in error_of(ts.load_series_data, tmp_path / "d",
                                                               fill_missing="mean")


def test_fill_missing_ffill_and_zero_values(tmp_path):
    rows = [["", "1"], ["2", ""], ["NaN", "3"], ["4", "5"]]
    path = write_csv(tmp_path / "r.csv", ["a", "b"], rows)
    text = error_of(ts.read_for_prediction, path, {"window_size": 4}, ["a", "b"])
    assert f"{path} line 2, column 'a': missing value" in text
    ffill, _ = ts.read_for_prediction(path, {"window_size": 4, "fill_missing": "ffill"}, ["a", "b"])
    np.testing.assert_array_equal(ffill[0], [[2, 1], [2, 1], [2, 3], [4, 5]])  # leading gap: first value
    zero, _ = ts.read_for_prediction(path, {"window_size": 4, "fill_missing": "zero"}, ["a", "b"])
    np.testing.assert_array_equal(zero[0], [[0, 1], [2, 0], [0, 3], [4, 5]])
    empty = write_csv(tmp_path / "e.csv", ["a", "b"], [["", "1"], ["", "2"]])
    text = error_of(ts.read_for_prediction, empty, {"window_size": 2, "fill_missing": "ffill"}, ["a", "b"])
    assert f"column 'a' in {empty} has no values" in text


def test_fill_missing_in_training_notes_the_count(tmp_path, rng):
    paths = write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3))
    lines = paths[0].read_text().splitlines()
    lines[2] = "," + lines[2].split(",", 1)[1]
    paths[0].write_text("\n".join(lines) + "\n")
    data = ts.load_series_data(tmp_path / "d", fill_missing="zero")
    assert "filled 1 missing cells in 1 files (--fill-missing zero)" in data.notes


def test_file_with_other_channels_names_both_files(tmp_path, rng):
    paths = write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3))
    values = make_activity_recordings(rng, classes=("sit",), per_class=1, channels=2)[0][1]
    write_csv(paths[-1], ["acc_x", "acc_y"], _cells(values))
    text = error_of(ts.load_series_data, tmp_path / "d")
    first = tmp_path / "d" / "run" / "rec_000.csv"  # the first file read (class folders in sorted order)
    assert f"{paths[-1]} has 2 channels (acc_x, acc_y) but {first} has 3 (acc_x, acc_y, acc_z)" in text
    write_csv(paths[-1], ["acc_x", "acc_y", "gyro_z"], _cells(np.hstack([values, values[:, :1]])))
    assert "(acc_x, acc_y, gyro_z)" in error_of(ts.load_series_data, tmp_path / "d")


def test_bad_folders_and_paths(tmp_path, rng):
    text = error_of(ts.load_series_data, tmp_path / "missing")
    assert "does not exist" in text and "(a) one CSV per recording" in text
    (tmp_path / "empty").mkdir()
    text = error_of(ts.load_series_data, tmp_path / "empty")
    assert "no CSV or .npz files in" in text and "(c) one .npz file" in text
    write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3))
    (tmp_path / "d" / "jump").mkdir()
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert f"class folder {tmp_path / 'd' / 'jump'} holds no CSV files" in text
    (tmp_path / "notes.txt").write_text("x")
    text = error_of(ts.load_series_data, tmp_path / "notes.txt")
    assert "is neither a folder, a .csv nor a .npz file" in text
    assert "--data-dir" in error_of(ts.load_series_data, None)


def test_empty_file_and_ragged_rows(tmp_path, rng):
    paths = write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=3))
    paths[1].write_text("")
    assert f"{paths[1]} is empty" in error_of(ts.load_series_data, tmp_path / "d")
    paths[1].write_text("acc_x,acc_y,acc_z\n1,2,3\n4,5\n")
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert f"{paths[1]} line 3 has 2 cells but the header has 3 columns" in text


def test_a_window_far_longer_than_every_recording_is_refused(tmp_path, rng):
    recs = make_activity_recordings(rng, per_class=3)
    write_recordings(tmp_path / "d", recs)
    longest = max(len(values) for _, values in recs)
    assert ts.load_series_data(tmp_path / "d", window_size=2 * longest).window_size == 2 * longest
    text = error_of(ts.load_series_data, tmp_path / "d", window_size=2 * longest + 1)
    assert text.startswith(f"--window-size {2 * longest + 1} is more than twice the longest recording "
                           f"({longest} steps)") and f"pass --window-size {longest} or less" in text


def test_one_class_is_refused(tmp_path, rng):
    recs = make_activity_recordings(rng, per_class=3)
    write_recordings(tmp_path / "d", [r for r in recs if r[0] == "sit"])
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert text == (f"{tmp_path / 'd'} holds one class only (sit); a classifier needs recordings of at "
                    "least two classes (one folder, or one label, per class)")


def test_too_few_recordings_per_class(tmp_path, rng):
    recs = make_activity_recordings(rng, per_class=3)
    sit = [r for r in recs if r[0] == "sit"]
    write_recordings(tmp_path / "d", [r for r in recs if r[0] != "sit"] + sit[:2])
    text = error_of(ts.load_series_data, tmp_path / "d")
    assert "class 'sit' has only 2 recording(s)" in text and "at least 3 per class" in text
    assert "add recordings of 'sit' or lower the fractions" in text
    data = ts.load_series_data(tmp_path / "d", test_fraction=0)
    assert set(data.splits) == {"train", "val"}
    assert "no test split: the final evaluation is on val" in data.notes


@pytest.mark.parametrize("val, test", [(0, 0.1), (0.2, -0.1), (0.5, 0.5), (0.9, 0.2)])
def test_bad_fractions(recordings_dir, val, test):
    text = error_of(ts.load_series_data, recordings_dir, val_fraction=val, test_fraction=test)
    assert "must satisfy 0 < val, 0 <= test and val + test < 1" in text


def test_split_is_reproducible_and_depends_on_seed(tmp_path, rng):
    write_recordings(tmp_path / "d", make_activity_recordings(rng, per_class=10, min_len=20, max_len=20))
    first = ts.load_series_data(tmp_path / "d", seed=3).split_ids
    assert ts.load_series_data(tmp_path / "d", seed=3).split_ids == first
    assert any(ts.load_series_data(tmp_path / "d", seed=s).split_ids != first for s in (4, 5, 6))
    assert [len(first[s]) for s in ("train", "val", "test")] == [3 * 6, 3 * 2, 3 * 2]


# ---------------------------------------------------------------- layout (b)


def _segments(rng, groups: int = 4, length: int = 50):
    recs = make_activity_recordings(rng, per_class=groups, min_len=length, max_len=length)
    return [(f"s{i % groups}", name, values) for i, (name, values) in enumerate(recs)]


def test_long_csv_with_group_column_windows_and_group_ids(tmp_path, rng):
    path = write_long(tmp_path / "long.csv", _segments(rng))
    data = ts.load_series_data(path, group_column="subject", window_size=20)
    assert data.layout == "long" and data.channels == CHANNELS and data.classes == ["run", "sit", "walk"]
    assert data.options["stride"] == 10 and data.options["group_column"] == "subject"
    # 12 runs of 50 rows (one group and class each): starts 0, 10, 20, 30 -> 4 windows each
    assert sum(len(s.ids) for s in data.splits.values()) == 12 * 4
    ids = {i for s in data.splits.values() for i in s.ids}
    assert ids == {f"long.csv:s{i}" for i in range(4)}
    assert_no_leak(data)


def test_long_csv_groups_never_cross_splits(tmp_path, rng):
    """Every group holds all classes; stratified by majority, all windows of a group stay together."""
    for f in range(2):
        segments = []
        for g in range(5):
            for name, values in make_activity_recordings(rng, per_class=1, min_len=30, max_len=30):
                segments.append((f"subj{g}", name, values))
        write_long(tmp_path / "d" / f"part{f}.csv", segments)
    data = ts.load_series_data(tmp_path / "d", group_column="subject", window_size=10, stride=5)
    assert_no_leak(data)
    assert sum(len(v) for v in data.split_ids.values()) == 10  # "part0.csv:subj0" differs from part1's
    for split in data.splits.values():
        assert sorted(set(split.y.tolist())) == [0, 1, 2]


def test_long_folder_without_group_column_groups_by_file(tmp_path, rng):
    for i, (name, values) in enumerate(make_activity_recordings(rng, per_class=3, min_len=64, max_len=64)):
        write_long(tmp_path / "d" / f"rec{i}.csv", [(None, name, values)], group_column=None)
    data = ts.load_series_data(tmp_path / "d", window_size=32)
    assert data.layout == "long" and data.options["stride"] == 16
    assert {i for v in data.split_ids.values() for i in v} == {f"rec{i}.csv" for i in range(9)}
    assert_no_leak(data)


def test_long_default_window_is_128_or_the_shortest_group(tmp_path, rng):
    path = write_long(tmp_path / "a.csv", _segments(rng, length=300))
    assert ts.load_series_data(path, group_column="subject").window_size == 128
    segments = _segments(rng, length=60)
    segments[5] = (segments[5][0], segments[5][1], segments[5][2][:45])
    path = write_long(tmp_path / "b.csv", segments)
    data = ts.load_series_data(path, group_column="subject")
    assert data.window_size == 45 and data.options["stride"] == 22
    assert any(n.startswith("window_size 45: the shortest group (b.csv:s1) has 45 rows") for n in data.notes)


def test_majority_label_and_pure_windows(tmp_path):
    labels = ["a"] * 3 + ["b"] + ["b"] * 4 + ["c"] * 4
    values = np.arange(36, dtype=np.float32).reshape(12, 3)
    segments = [(f"g{i}", list(labels), values) for i in range(3)]
    path = write_long(tmp_path / "l.csv", segments)
    data = ts.load_series_data(path, group_column="subject", window_size=4, stride=2, test_fraction=0)
    windows = [(x[0, 0], y) for s in data.splits.values() for x, y in zip(s.X, s.y, strict=True)]
    # starts 0..8: [a a a b] -> a, [a b b b] -> b, [b b b b] -> b, [b b c c] -> b (a tie: the first
    # class), [c c c c] -> c
    by_start = {int(x0) // 3: data.classes[y] for x0, y in windows}
    assert by_start == {0: "a", 2: "b", 4: "b", 6: "b", 8: "c"}
    pure = ts.load_series_data(path, group_column="subject", window_size=4, stride=2, pure_windows=True,
                               test_fraction=0)
    starts = sorted({int(x[0, 0]) // 3 for s in pure.splits.values() for x in s.X})
    assert starts == [4, 8] and pure.classes == ["b", "c"]
    assert "pure_windows: dropped 9 of 15 windows holding several labels" in pure.notes
    assert any("labels 'a' are the majority of no window" in n for n in pure.notes)


def test_long_missing_label_column_and_header(tmp_path, rng):
    path = write_long(tmp_path / "l.csv", _segments(rng))
    text = error_of(ts.load_series_data, path, label_column="activity", group_column="subject")
    assert f"{path} has no label column 'activity'" in text
    assert "subject, t, label, acc_x, acc_y, acc_z" in text and "--label-column" in text
    text = error_of(ts.load_series_data, path, group_column="session")
    assert "has no group column 'session'" in text and "--group-column" in text
    headerless = write_csv(tmp_path / "h.csv", None, [["1", "2", "0"]] * 5)
    text = error_of(ts.load_series_data, headerless)
    assert f"{headerless} has no header row; long recordings (layout b) need column names" in text


def test_long_empty_label_cell(tmp_path):
    path = write_csv(tmp_path / "l.csv", ["label", "x"], [["a", "1"], ["", "2"]])
    text = error_of(ts.load_series_data, path)
    assert f"{path} line 3: empty label cell in column 'label'" in text


def test_long_window_larger_than_every_group(tmp_path, rng):
    path = write_long(tmp_path / "l.csv", _segments(rng, length=30))
    text = error_of(ts.load_series_data, path, group_column="subject", window_size=64)
    assert "no window of 64 steps fits: the longest group" in text and "lower --window-size" in text


# ---------------------------------------------------------------- layout (c)


def test_npz_with_int_and_string_labels(tmp_path, rng):
    X = rng.standard_normal((12, 16, 2)).astype(np.float32)
    np.savez(tmp_path / "set.npz", X=X, y=np.arange(12) % 3)
    data = ts.load_series_data(tmp_path / "set.npz")
    assert data.layout == "npz" and data.classes == ["0", "1", "2"] and data.channels == ["ch0", "ch1"]
    assert data.window_size == 16
    train = data.splits["train"]
    for x, y, rid in zip(train.X, train.y, train.ids, strict=True):
        i = int(rid.removeprefix("sample_"))
        np.testing.assert_array_equal(x, X[i])
        assert int(y) == i % 3
    assert_no_leak(data)
    (tmp_path / "f").mkdir()
    np.savez(tmp_path / "f" / "other.npz", X=X, y=np.array(["walk", "run", "sit"] * 4))
    data = ts.load_series_data(tmp_path / "f")
    assert data.layout == "npz" and data.classes == ["run", "sit", "walk"]


def test_bad_npz_files(tmp_path, rng):
    X = rng.standard_normal((6, 8, 2))
    np.savez(tmp_path / "a.npz", X=X, labels=np.zeros(6))
    text = error_of(ts.load_series_data, tmp_path / "a.npz")
    assert "holds no array 'y' (it holds: X, labels)" in text
    np.savez(tmp_path / "b.npz", X=X, y=np.array([{"a": 1}] * 6, dtype=object))
    assert "cannot be read as .npz" in error_of(ts.load_series_data, tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", X=X, y=np.zeros(5))
    assert "y must hold one class label per window" in error_of(ts.load_series_data, tmp_path / "c.npz")
    X[1, 2, 0] = np.nan
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(6) % 2)
    text = error_of(ts.load_series_data, tmp_path / "d.npz", test_fraction=0)
    assert "window 1, step 2, channel 0" in text and "--fill-missing" in text
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    assert "cannot be read as .npz" in error_of(ts.load_series_data, tmp_path / "e.npz")


# ---------------------------------------------------------------- --data-glob


def test_data_glob_merges_folders_with_prefixed_ids(tmp_path, rng):
    for name in ("a_data", "b_data"):
        write_recordings(tmp_path / name, make_activity_recordings(rng, per_class=2, min_len=30, max_len=30))
    data = ts.load_series_data(tmp_path, data_glob="*_data")
    ids = {i for v in data.split_ids.values() for i in v}
    assert len(ids) == 12 and "a_data/walk/rec_000.csv" in ids and "b_data/walk/rec_000.csv" in ids
    assert any(n.startswith("merged 2 data folders") for n in data.notes)
    assert_no_leak(data)
    text = error_of(ts.load_series_data, tmp_path, data_glob="*_nothing")
    assert "--data-glob" in text and "matches no folder or file" in text


def test_data_glob_refuses_other_channels_or_layouts(tmp_path, rng):
    write_recordings(tmp_path / "a_data", make_activity_recordings(rng, per_class=2))
    write_recordings(tmp_path / "b_data", make_activity_recordings(rng, per_class=2, channels=2))
    text = error_of(ts.load_series_data, None, data_glob=str(tmp_path / "*_data"))
    assert f"the channels of {tmp_path / 'b_data'} (acc_x, acc_y" in text
    assert f"differ from those of {tmp_path / 'a_data'} (acc_x, acc_y, acc_z)" in text
    write_long(tmp_path / "c_data" / "l.csv", _segments(rng))
    text = error_of(ts.load_series_data, tmp_path, data_glob="[ac]_data")
    assert "holds long CSV recordings" in text and "--data-glob merges folders of one layout" in text


# ---------------------------------------------------------------- normaliser and dataset


def test_normalizer_uses_training_windows_only(tmp_path, rng):
    write_recordings(tmp_path / "d" / "train", make_activity_recordings(rng, per_class=3))
    val = [(n, v + 1000.0) for n, v in make_activity_recordings(rng, per_class=1)]
    write_recordings(tmp_path / "d" / "val", val)
    data = ts.load_series_data(tmp_path / "d")
    stats = ts.fit_normalizer(data.splits["train"].X)
    train = data.splits["train"].X
    np.testing.assert_allclose(stats["mean"], train.mean(axis=(0, 1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["std"], train.std(axis=(0, 1)), rtol=1e-5)
    assert max(abs(m) for m in stats["mean"]) < 10  # the val offset of 1000 did not leak in
    assert isinstance(stats["mean"][0], float) and len(stats["std"]) == 3
    normed = ts.normalize(train, stats)
    assert normed.dtype == np.float32
    np.testing.assert_allclose(normed.mean(axis=(0, 1)), 0, atol=1e-4)
    assert ts.normalize(data.splits["val"].X, stats).mean() > 100
    val_set = ts.SeriesDataset(data.splits["val"].X, data.splits["val"].y, stats)  # train stats, not its own
    assert val_set.X.mean().item() > 100


def test_normalizer_std_floor_and_channel_check():
    X = np.ones((4, 5, 2), np.float32)
    stats = ts.fit_normalizer(X)
    assert stats == {"mean": [1.0, 1.0], "std": [1e-6, 1e-6]}
    assert np.isfinite(ts.normalize(X, stats)).all()
    text = error_of(ts.normalize, np.ones((1, 5, 3), np.float32), stats)
    assert "3 channels but the model was trained on 2" in text


def test_series_dataset_gives_normalised_channels_first_tensors(rng):
    X = rng.standard_normal((6, 10, 3)).astype(np.float32) * 5 + 2
    y = np.array([0, 1, 2, 0, 1, 2])
    stats = ts.fit_normalizer(X)
    ds = ts.SeriesDataset(X, y, stats)
    assert len(ds) == 6 and ds.X.shape == (6, 3, 10) and ds.X.dtype == torch.float32
    x, label = ds[4]
    assert x.shape == (3, 10) and isinstance(label, int) and label == 1
    np.testing.assert_allclose(x.numpy(), ts.normalize(X, stats)[4].T, rtol=1e-6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    assert batch[0].shape == (6, 3, 10) and batch[1].tolist() == y.tolist()


# ---------------------------------------------------------------- prediction and splits.json


def test_read_for_prediction_long_recording_window_starts(tmp_path):
    values = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    path = write_csv(tmp_path / "r.csv", ["time", "acc_z", "acc_x", "acc_y", "label"],
                     [[str(t), *row, "walk"] for t, row in enumerate(_cells(values[:, [2, 0, 1]]))])
    windows, starts = ts.read_for_prediction(path, {"window_size": 40, "stride": 20}, CHANNELS)
    assert starts == [0, 20, 40, 60] and windows.shape == (4, 40, 3) and windows.dtype == np.float32
    np.testing.assert_array_equal(windows[2], values[40:80])  # columns picked by name, not position
    _, starts = ts.read_for_prediction(path, {"window_size": 30, "stride": None}, CHANNELS)
    assert starts == [0, 30, 60, 70]  # stride defaults to window_size; the last window ends on the last row


def test_read_for_prediction_short_recording_and_bad_columns(tmp_path):
    values = np.ones((7, 3), np.float32)
    path = write_csv(tmp_path / "r.csv", CHANNELS, _cells(values))
    windows, starts = ts.read_for_prediction(path, {"window_size": 10, "stride": 5}, CHANNELS)
    assert starts == [0] and windows.shape == (1, 10, 3)
    np.testing.assert_array_equal(windows[0, 7:], 0)
    text = error_of(ts.read_for_prediction, path, {"window_size": 10}, ["acc_x", "gyro_x"])
    assert f"{path} has no column 'gyro_x'" in text and "trained on the columns 'acc_x', 'gyro_x'" in text
    bare = write_csv(tmp_path / "bare.csv", None, _cells(values))
    text = error_of(ts.read_for_prediction, bare, {"window_size": 10}, CHANNELS)
    assert f"{bare} has no header row" in text
    text = error_of(ts.read_for_prediction, tmp_path / "nope.csv", {"window_size": 4}, CHANNELS)
    assert "is not a file" in text


def test_prediction_reads_a_training_recording_like_training(recordings_dir):
    data = ts.load_series_data(recordings_dir, window_size=80)
    train = data.splits["train"]
    path = recordings_dir / train.ids[0]
    windows, starts = ts.read_for_prediction(path, data.options, data.channels)
    assert starts == [0]
    np.testing.assert_array_equal(windows[0], train.X[0])


def test_write_splits_json(recordings_dir, tmp_path):
    data = ts.load_series_data(recordings_dir)
    out = tmp_path / "run" / "splits.json"
    ts.write_splits_json(data, out)
    saved = json.loads(out.read_text())
    assert saved == {"train": data.split_ids["train"], "val": data.split_ids["val"],
                     "test": data.split_ids["test"], "layout": "per-recording"}
    assert [p.name for p in out.parent.iterdir()] == ["splits.json"]  # no temporary file left


def test_subjects_doing_every_activity_are_split_as_a_whole(tmp_path, rng):
    """Wearable exports: every subject does every activity. Bucketing subjects by their majority
    class would leave one or two per bucket and give training almost none of them."""
    recs = make_activity_recordings(rng, per_class=8, min_len=100, max_len=100)
    by_class: dict[str, list] = {}
    for name, values in recs:
        by_class.setdefault(name, []).append(values)
    names = ("walk", "run", "sit")
    # subject i spends longest on activity i % 3, so the majority classes differ between subjects
    segments = [(f"s{i}", name, by_class[name][i][: 100 if k == i % 3 else 50])
                for i in range(8) for k, name in enumerate(names)]
    data = ts.load_series_data(write_long(tmp_path / "subjects.csv", segments), group_column="subject",
                               window_size=32, stride=16, seed=42)
    counts = {split: len(ids) for split, ids in data.split_ids.items()}
    assert counts == {"train": 6, "val": 1, "test": 1}, counts
    assert_no_leak(data)
