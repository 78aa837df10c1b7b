"""What the plots show: curves.png (accuracy in %, Dice/IoU for segmentation, an lr panel, sensible
axes for one or two epochs) and class names in any script (a font that has their glyphs, else class
indices and a list beside the picture; never a matplotlib warning)."""
from __future__ import annotations

import logging
import math
import warnings

import pytest

from common import reporting as rep


def history(n: int, segmentation: bool = False, lr=lambda e: 1e-3) -> list[dict[str, float]]:
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "lr": lr(e), "samples_per_s": 20.0,
               "epoch_time": 1.0}
        if segmentation:
            row.update(train_dice=0.5 + e / 100, train_iou=0.4, val_dice=0.6 + e / 100, val_iou=0.45)
        else:
            row.update(train_acc=0.5 + e / 100, val_acc=0.55 + e / 100)
        rows.append(row)
    return rows


def panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes}


def lines(ax) -> dict[str, list[float]]:
    return {line.get_label(): [float(v) for v in line.get_ydata()] for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_accuracy_is_plotted_in_percent_like_the_console(tmp_path):
    fig = rep.plot_curves(history(2), tmp_path / "curves.png", baseline={"val_acc": 0.4, "val_loss": 2.0})
    acc = panels(fig)["accuracy (%)"]
    plotted = lines(acc)
    assert plotted["train"] == pytest.approx([51.0, 52.0])
    assert plotted["val"] == pytest.approx([56.0, 57.0])
    assert plotted["val before training"] == pytest.approx([40.0, 40.0])
    assert lines(panels(fig)["loss"])["val"] == pytest.approx([1.2, 0.6])
    assert (tmp_path / "curves.png").stat().st_size > 2000


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_epochs_have_whole_epoch_ticks_and_visible_points(tmp_path, n):
    fig = rep.plot_curves(history(n), tmp_path / "curves.png")
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert low == pytest.approx(0.5) and high == pytest.approx(n + 0.5)  # not a degenerate range
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [float(e) for e in range(1, n + 1)]  # epochs 1 (and 2), no 1.25 or 0.8
        markers = [line.get_marker() for line in ax.get_lines()]
        assert markers == ["o"] * len(markers)  # a single point shows


def test_the_lr_panel_is_log_scaled_when_it_spans_decades_and_readable_when_constant(tmp_path):
    cosine = history(20, lr=lambda e: 1e-3 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 20)) + 1e-6)
    fig = rep.plot_curves(cosine, tmp_path / "curves.png")
    lr = panels(fig)["learning rate (log scale)"]
    assert lr.get_yscale() == "log"
    assert list(lr.get_lines()[0].get_ydata()) == pytest.approx([r["lr"] for r in cosine])
    assert lr.get_lines()[0].get_marker() == "o"  # 20 epochs: still marked
    fig = rep.plot_curves(history(3), tmp_path / "curves.png")
    constant = panels(fig)["learning rate (constant 0.001)"]
    assert constant.get_yscale() == "linear"
    low, high = constant.get_ylim()
    assert low == 0 and high > 1e-3  # the value is inside the axis, not on its edge
    labels = [constant.yaxis.get_major_formatter()(t, i) for i, t in enumerate(constant.get_yticks())]
    assert "0.001" in labels  # plain numbers, not an offset in a corner
    steps = history(4, lr=lambda e: 1e-2 if e < 3 else 0.0)  # a step to 0: linear from 0
    assert panels(rep.plot_curves(steps, tmp_path / "curves.png"))["learning rate"].get_yscale() == "linear"


def test_many_epochs_drop_the_markers(tmp_path):
    fig = rep.plot_curves(history(60), tmp_path / "curves.png")
    assert panels(fig)["loss"].get_lines()[0].get_marker() in ("None", None, "")


def test_segmentation_curves_show_dice_and_iou_instead_of_accuracy(tmp_path):
    fig = rep.plot_curves(history(2, segmentation=True), tmp_path / "curves.png")
    titles = list(panels(fig))
    assert titles == ["loss", "Dice / IoU", "learning rate (constant 0.001)"]
    plotted = lines(panels(fig)["Dice / IoU"])
    assert plotted["val Dice"] == pytest.approx([0.61, 0.62])
    assert plotted["val IoU"] == pytest.approx([0.45, 0.45])
    assert set(plotted) == {"train Dice", "val Dice", "train IoU", "val IoU"}


# --- class names that the default font cannot draw ---

CJK = ["猫", "狗", "cat"]


def drawn_without_warnings(caplog, draw):
    """Run draw() recording every warning (always shown) and matplotlib's log; return its result."""
    with warnings.catch_warnings(record=True) as caught, \
            caplog.at_level(logging.WARNING, logger="matplotlib"):
        warnings.simplefilter("always")
        result = draw()
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("matplotlib")] == []
    return result


def tick_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_xticklabels()]


def test_without_a_font_for_the_names_the_picture_uses_indices_and_lists_the_names(tmp_path, caplog,
                                                                                  monkeypatch):
    monkeypatch.setattr(rep, "_covering_font", lambda needed, entries: None)  # no installed font has them
    path = tmp_path / "confusion_matrix.png"
    fig = drawn_without_warnings(caplog, lambda: rep.plot_confusion_matrix(
        [[3, 1, 0], [0, 2, 0], [0, 0, 4]], CJK, path))
    assert tick_texts(fig) == ["0", "1", "2: cat"]  # a drawable name keeps its name
    listing = tmp_path / "confusion_matrix_classes.txt"
    assert listing.read_text(encoding="utf-8") == "0\t猫\n1\t狗\n2\tcat\n"
    assert "confusion_matrix_classes.txt" in fig.axes[0].get_xlabel()
    assert path.stat().st_size > 2000


def test_the_fallback_is_what_happens_on_a_machine_without_cjk_fonts(tmp_path, caplog, monkeypatch):
    """The real font list of this machine, without any CJK font (as on this project's CI): no warning."""
    from matplotlib import font_manager

    monkeypatch.setattr(font_manager.fontManager, "ttflist",
                        [e for e in font_manager.fontManager.ttflist
                         if 0x732B not in rep._charmap(e.fname, e.index) or e.name.startswith("Last Resort")])
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger(rep.LOGGER_NAME)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    monkeypatch.setattr(rep, "_NAMED", set())
    try:
        fig = drawn_without_warnings(caplog, lambda: rep.plot_confusion_matrix(
            [[1, 0, 0], [0, 1, 0], [0, 0, 1]], CJK, tmp_path / "cm.png", title="猫狗 on the test split"))
        rep.plot_confusion_matrix([[1, 0, 0], [0, 1, 0], [0, 0, 1]], CJK, tmp_path / "cm.png")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert tick_texts(fig) == ["0", "1", "2: cat"]
    assert fig.axes[0].get_title() == "confusion matrix"  # an undrawable title is not drawn as boxes
    (notice,) = records  # said once for these names, not at every picture
    assert notice.startswith("notice: no installed font has the characters of the class names (猫, 狗, cat)")
    assert str(tmp_path / "cm_classes.txt") in notice


def toy_font(path, family: str, chars: str) -> None:
    """A TrueType font with one square glyph for each of `chars` (nothing else)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef"] + [f"uni{ord(c):04X}" for c in chars]
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({ord(c): name for c, name in zip(chars, names[1:], strict=True)})
    pen = TTGlyphPen(None)
    for point in ((100, 0), (100, 700), (800, 700), (800, 0)):
        (pen.moveTo if point == (100, 0) else pen.lineTo)(point)
    pen.closePath()
    glyph = pen.glyph()
    builder.setupGlyf({name: glyph for name in names})
    builder.setupHorizontalMetrics({name: (900, 100) for name in names})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=800, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    builder.save(str(path))


def test_an_installed_font_with_the_glyphs_draws_the_names(tmp_path, caplog, monkeypatch):
    pytest.importorskip("fontTools")
    from matplotlib import font_manager

    monkeypatch.setattr(font_manager.fontManager, "ttflist", list(font_manager.fontManager.ttflist))
    toy_font(tmp_path / "toy.ttf", "Toy Han Sans", "猫狗")
    font_manager.fontManager.addfont(str(tmp_path / "toy.ttf"))
    try:
        assert rep.font_family_for(CJK) == ["sans-serif", "Toy Han Sans"]
        path = tmp_path / "confusion_matrix.png"
        fig = drawn_without_warnings(caplog, lambda: rep.plot_confusion_matrix(
            [[3, 1, 0], [0, 2, 0], [0, 0, 4]], CJK, path, title="猫 vs 狗"))
    finally:
        font_manager.fontManager._findfont_cached.cache_clear()
    assert tick_texts(fig) == CJK  # the names themselves
    assert "Toy Han Sans" in fig.axes[0].get_xticklabels()[0].get_fontfamily()
    assert fig.axes[0].get_title() == "猫 vs 狗"
    assert not (tmp_path / "confusion_matrix_classes.txt").exists()


def test_the_cjk_fonts_come_before_other_fonts_that_have_the_glyphs(monkeypatch):
    needed = frozenset({0x732B})
    monkeypatch.setattr(rep, "_charmap", lambda fname, index=0: needed)  # every font has the glyph
    entries = (("Zzz Unicode", "z.ttf", 0), ("Last Resort High-Efficiency", "l.ttf", 0),
               ("Microsoft YaHei", "msyh.ttc", 0), ("Noto Sans CJK SC", "noto.ttc", 0))
    rep._covering_font.cache_clear()
    try:
        assert rep._covering_font(needed, entries) == "Noto Sans CJK SC"
        assert rep._covering_font(needed, entries[:3]) == "Microsoft YaHei"
        assert rep._covering_font(needed, entries[:2]) == "Zzz Unicode"  # never the placeholder font
        assert rep._covering_font(needed, entries[1:2]) is None
    finally:
        rep._covering_font.cache_clear()


def test_latin_names_change_nothing():
    assert rep.font_family_for(["cat", "dog", "Ökologie", "кошка"]) == []  # DejaVu Sans has these
