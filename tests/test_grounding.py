"""Grounding helpers: pixel boxes <-> `<ref>…</ref><box>(x1,y1),(x2,y2)</box>` text, and drawing."""

import random
import sys

import pytest
from PIL import Image

from qwenvl.grounding import draw_boxes, format_box, format_quad, format_ref_boxes, parse_boxes, parse_quads


# --- format_box ------------------------------------------------------------------------------------------------------


def test_format_box_writes_normalised_integers_in_0_999():
    assert format_box((0, 0, 640, 480), (640, 480)) == "<box>(0,0),(999,999)</box>"
    # floor(v / W * 1000): 64/640 -> 100, 479.9/480 -> 999
    assert format_box((64, 48, 320, 479.9), (640, 480)) == "<box>(100,100),(500,999)</box>"


def test_format_box_clips_coordinates_outside_the_image():
    assert format_box((-20, -1, 700, 481), (640, 480)) == "<box>(0,0),(999,999)</box>"


@pytest.mark.parametrize(
    "box, size",
    [
        ((10, 10, 5, 20), (100, 100)),
        ((1, 2, 3), (100, 100)),
        ((0, 0, float("nan"), 1), (100, 100)),
        ((0, 0, 1, 1), (0, 100)),
        ((0, 0, 1, 1), (100,)),
    ],
)
def test_format_box_rejects_malformed_input(box, size):
    with pytest.raises(ValueError):
        format_box(box, size)


def test_format_ref_boxes_and_quad():
    text = format_ref_boxes("two cats", [(0, 0, 50, 50), (50, 50, 100, 100)], (100, 100))
    assert text == "<ref>two cats</ref><box>(0,0),(500,500)</box><box>(500,500),(999,999)</box>"
    quad = format_quad([(0, 0), (100, 0), (100, 50), (0, 50)], (200, 100))
    assert quad == "<quad>(0,0),(500,0),(500,500),(0,500)</quad>"


# --- round trip ------------------------------------------------------------------------------------------------------


def test_round_trip_is_within_one_pixel_for_random_boxes_up_to_2000px():
    rng = random.Random(0)
    for _ in range(3000):
        width, height = rng.randint(1, 2000), rng.randint(1, 2000)
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        [(ref, decoded)] = parse_boxes(format_box((x1, y1, x2, y2), (width, height)), (width, height))
        assert ref is None
        assert max(abs(a - b) for a, b in zip(decoded, (x1, y1, x2, y2), strict=True)) <= 1.0


def test_scale_999_is_the_original_evaluation_convention():
    # eval_mm/evaluate_grounding.py: pixel = v / 999 * W
    [(_, box)] = parse_boxes("<box>(999,0),(499,999)</box>", (999, 1998), scale=999)
    assert box == pytest.approx((499.0, 0.0, 999.0, 1998.0))
    rng = random.Random(1)
    for _ in range(500):
        width, height = rng.randint(1, 2000), rng.randint(1, 2000)
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        [(_, decoded)] = parse_boxes(format_box((x1, y1, x2, y2), (width, height), scale=999), (width, height), 999)
        step = max(width, height) / 999
        assert max(abs(a - b) for a, b in zip(decoded, (x1, y1, x2, y2), strict=True)) <= step / 2 + 1e-9


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="scale"):
        parse_boxes("<box>(1,1),(2,2)</box>", (10, 10), scale=100)


# --- parsing model output --------------------------------------------------------------------------------------------


def test_parse_boxes_pairs_each_box_with_its_ref():
    text = (
        "<ref>击掌</ref><box>(536,509),(588,602)</box> and "
        "<ref>dogs</ref><box>(0,0),(99,99)</box><box>(100,100),(199,199)</box>"
    )
    result = parse_boxes(text, (1000, 1000))
    assert [ref for ref, _ in result] == ["击掌", "dogs", "dogs"]
    assert result[0][1] == pytest.approx((536.5, 509.5, 588.5, 602.5))


def test_text_between_a_ref_and_a_box_ends_the_ref():
    result = parse_boxes("<ref>cat</ref> is here: <box>(1,1),(2,2)</box>", (1000, 1000))
    assert [ref for ref, _ in result] == [None]


def test_parse_boxes_tolerates_spaces_missing_tags_and_swapped_corners():
    size = (1000, 1000)
    assert parse_boxes("<box>( 10 , 20 ),( 30 , 40 )</box>", size)[0][1] == pytest.approx((10.5, 20.5, 30.5, 40.5))
    # A RefCOCO-style completion decoded alone: the prompt ended in "<box>".
    assert parse_boxes("(10,20),(30,40)</box>", size)[0][1] == pytest.approx((10.5, 20.5, 30.5, 40.5))
    assert parse_boxes("<box>(10,20),(30,40)", size)[0][1] == pytest.approx((10.5, 20.5, 30.5, 40.5))
    assert parse_boxes("<box>(30,40),(10,20)</box>", size)[0][1] == pytest.approx((10.5, 20.5, 30.5, 40.5))
    assert parse_boxes("<box>(0,0),(1200,5000)</box>", size)[0][1] == pytest.approx((0.5, 0.5, 999.5, 999.5))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no boxes here",
        "(1,2),(3,4)",
        "<box>(1,2),(3</box>",
        "<box>(a,b),(c,d)</box>",
        "<box></box>",
        "<box>(1,2)</box>",
        "<box>(-1,2),(3,4)</box>",
        "<box>(12345678,2),(3,4)</box>",
        "<ref>unclosed<box>",
    ],
)
def test_malformed_output_gives_no_box(text):
    assert parse_boxes(text, (100, 100)) == []


def test_parse_boxes_never_raises_on_random_model_output():
    rng = random.Random(2)
    alphabet = [
        "<box>",
        "</box>",
        "<ref>",
        "</ref>",
        "<quad>",
        "</quad>",
        "(",
        ")",
        ",",
        " ",
        "1",
        "99",
        "1000",
        "x",
        "狗",
        "\n",
        "-",
    ]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for _, (x1, y1, x2, y2) in parse_boxes(text, (640, 480)):
            assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 480
        parse_quads(text, (640, 480))
    assert parse_boxes(None, (10, 10)) == []


def test_bad_image_size_is_a_caller_error():
    with pytest.raises(ValueError, match="image_size"):
        parse_boxes("<box>(1,1),(2,2)</box>", (0, 10))


def test_parse_quads():
    [(ref, quad)] = parse_quads("<ref>EXIT</ref><quad>(0,0),(499,0),(499,999),(0,999)</quad>", (2000, 1000))
    assert ref == "EXIT"
    assert [tuple(p) for p in quad] == [
        pytest.approx(p) for p in ((1.0, 0.5), (999.0, 0.5), (999.0, 999.5), (1.0, 999.5))
    ]
    assert parse_boxes("<quad>(0,0),(499,0),(499,999),(0,999)</quad>", (10, 10)) == []


# --- drawing ---------------------------------------------------------------------------------------------------------


def _network_and_font_audit():
    events = []

    def hook(event, args):
        if event.startswith("socket.") or (event == "open" and str(args[0]).lower().endswith((".ttf", ".otf"))):
            events.append((event, args))

    sys.addaudithook(hook)
    return events


def test_draw_boxes_draws_labelled_boxes_without_network_or_font_files():
    events = _network_and_font_audit()
    image = Image.new("RGB", (200, 100), "white")
    text = "<ref>left</ref><box>(50,100),(250,800)</box><box>(600,100),(900,900)</box>"
    drawn = draw_boxes(image, text)
    assert drawn is not image and drawn.size == image.size and drawn.mode == "RGB"
    assert image.getpixel((10, 10)) == (255, 255, 255)  # the input is not modified
    # The left edge of the first box (x = 10.1 px) is coloured, the inside of the box is not.
    assert drawn.getpixel((10, 50)) != (255, 255, 255)
    assert drawn.getpixel((30, 50)) == (255, 255, 255)
    # The label sits at the top-left corner of the box.
    label_area = [drawn.getpixel((x, y)) for x in range(10, 30) for y in range(0, 20)]
    assert any(pixel != (255, 255, 255) for pixel in label_area)
    assert events == []


def test_draw_boxes_accepts_pixel_boxes_and_quads():
    image = Image.new("L", (100, 100), 255)
    drawn = draw_boxes(image, [(10, 10, 50, 50), ("b", (60, 60, 90, 90))])
    assert drawn.mode == "RGB"
    assert drawn.getpixel((10, 30)) != (255, 255, 255)
    assert drawn.getpixel((60, 75)) != (255, 255, 255)
    quad = draw_boxes(image, "<quad>(100,100),(900,100),(900,900),(100,900)</quad>")
    assert quad.getpixel((10, 50)) != (255, 255, 255)
    with pytest.raises(TypeError):
        draw_boxes("not an image", "")
