"""JSON/JSONL training rows may only name image files under the image root."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from qwenvl.train import load_rows


def write_rows(tmp_path, image_path: str):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    (tmp_path / "secret.png").write_bytes(b"x")
    rows = [{"images": ["ok.png"], "messages": []}, {"images": [image_path], "messages": []}]
    path = root / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path, root


@pytest.mark.parametrize("bad", ["../secret.png", "http://169.254.169.254/x.png", "/etc/passwd", "missing.png"])
def test_image_paths_outside_the_root_are_refused_with_the_row(tmp_path, bad):
    path, root = write_rows(tmp_path, bad)
    with pytest.raises(ValueError, match="row 1"):
        load_rows(path, root)


def test_image_paths_inside_the_root_resolve(tmp_path):
    path, root = write_rows(tmp_path, "ok.png")
    rows = load_rows(path, root)
    assert rows[1]["images"] == [str((root / "ok.png").resolve())]


def test_a_broken_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"messages": []}\n\n{"messages": [\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 3: invalid JSON"):
        load_rows(path, tmp_path)
