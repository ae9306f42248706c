"""Which test files get a submission row: every file under TEST_DIR but hidden ones, or exactly the
names of --list; names the CSV cannot hold are all reported before any model work."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from app.__main__ import main
from app.config import load_config
from app.infer import infer
from tests.test_outputs import save_tiny_model


def _image_bytes(fmt: str, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    save_tiny_model(path)
    return path


def _rows(out) -> list[str]:
    return [ln.split(", ")[0] for ln in (out / "submission.csv").read_text(encoding="utf-8").splitlines()]


def _infer(test_dir, out, model_file, list_file=None) -> dict:
    return infer(test_dir, out, load_config(None, {"num_workers": 0}), model_path=model_file, list_file=list_file)


def test_every_image_file_but_hidden_ones_gets_one_row(tmp_path, model_file):
    """Any suffix, any sub-folder: a file gets a row when its suffix is an image format's or its
    content decodes as an image; an undecodable file with an image suffix keeps its row."""
    test = tmp_path / "test"
    files = {"a.jpg": _image_bytes("JPEG", 0), "sub/b.png": _image_bytes("PNG", 1),
             "noext": _image_bytes("JPEG", 2), "c.webp": _image_bytes("WEBP", 3),
             "d.jpg_large": _image_bytes("JPEG", 4), "deep/er/é 1.JPEG": _image_bytes("JPEG", 5),
             "broken.jpg": b"not an image at all", "broken.bin": b"not an image at all",
             ".DS_Store": b"\0\0\0\1Bud1", "sub/._b.png": b"AppleDouble", ".cache/x.jpg": _image_bytes("JPEG", 6)}
    for name, data in files.items():
        (test / name).parent.mkdir(parents=True, exist_ok=True)
        (test / name).write_bytes(data)
    out = tmp_path / "out"
    report = _infer(test, out, model_file)
    assert _rows(out) == ["a.jpg", "broken.jpg", "c.webp", "d.jpg_large", "deep/er/é 1.JPEG", "noext", "sub/b.png"]
    assert report["unreadable"] == ["broken.jpg"] and report["not_images_skipped"] == ["broken.bin"]
    saved = json.loads((out / "infer_report.json").read_text())
    assert saved["hidden_files_skipped"] == 3
    assert saved["hidden_files"] == [".DS_Store", ".cache/x.jpg", "sub/._b.png"]
    assert saved["test_images"] == saved["rows_written"] == 7


def test_files_left_in_test_dir_that_are_not_images_get_no_row(tmp_path, model_file, caplog):
    """A README or labels.csv left in TEST_DIR (the contest's validator may reject their rows) is
    skipped and listed; an undecodable .jpg is a test image and keeps its row; a PNG named .csv
    decodes, so it is one too."""
    test = tmp_path / "test"
    (test / "sub").mkdir(parents=True)
    (test / "x.jpg").write_bytes(_image_bytes("JPEG", 0))
    (test / "README").write_text("test images of stage 2\n")
    (test / "labels.csv").write_text("image,label\nx.jpg,0001\n")
    (test / "sub" / "notes.txt").write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then nothing")
    (test / "cut.jpg").write_bytes(_image_bytes("JPEG", 1)[:40])        # undecodable .jpg
    (test / "photo.csv").write_bytes(_image_bytes("PNG", 2))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="app"):
        report = _infer(test, out, model_file)
    assert _rows(out) == ["cut.jpg", "photo.csv", "x.jpg"]
    assert report["not_images_skipped"] == ["README", "labels.csv", "sub/notes.txt"]
    assert report["unreadable"] == ["cut.jpg"] and report["rows_written"] == 3
    assert "3 file(s)" in caplog.text and "'README'" in caplog.text
    # with --list, every listed name is a test image
    listing = tmp_path / "list.txt"
    listing.write_text("README\nx.jpg\n")
    report = _infer(test, tmp_path / "out2", model_file, list_file=listing)
    assert _rows(tmp_path / "out2") == ["README", "x.jpg"] and report["unreadable"] == ["README"]
    # only files that are not images: a clear error before any model work
    only = tmp_path / "only"
    only.mkdir()
    (only / "README").write_text("nothing here")
    with pytest.raises(ValueError, match="1 files that are not images skipped"):
        _infer(only, tmp_path / "out3", model_file)


def test_list_names_are_taken_verbatim(tmp_path, model_file):
    test = tmp_path / "test"
    (test / "sub").mkdir(parents=True)
    for i, name in enumerate(["#1.jpg", "sub/b.png", "with space.jpg", "unlisted.jpg", "x.jpg"]):
        (test / name).write_bytes(_image_bytes("PNG" if name.endswith(".png") else "JPEG", i))
    listing = tmp_path / "list.txt"
    # CRLF line ends, a blank line, a name listed twice, a '#' that is part of a name, a space inside one
    listing.write_bytes("#1.jpg\r\nsub/b.png\r\n\r\nwith space.jpg\r\n#1.jpg\r\nx.jpg".encode())
    out = tmp_path / "out"
    report = _infer(test, out, model_file, list_file=listing)
    assert _rows(out) == ["#1.jpg", "sub/b.png", "with space.jpg", "x.jpg"]     # one row each, sorted
    assert report["list_duplicates"] == ["#1.jpg"] and report["unreadable"] == []


def test_names_the_csv_cannot_hold_are_all_reported_before_the_model_is_read(tmp_path, capsys):
    test = tmp_path / "test"
    test.mkdir()
    bad = ["a,b.jpg", "line\nbreak.jpg", "trailing.jpg ", ' lead.jpg', 'q"uote.jpg']
    for name in [*bad, "fine.jpg"]:
        (test / name).write_bytes(_image_bytes("JPEG", 0))
    model = tmp_path / "model.pt"
    model.write_bytes(b"not a model: reading it would fail")
    code = main(["infer", str(test), str(tmp_path / "out"), "--model", str(model)])
    err = capsys.readouterr().err
    assert code == 1 and "5 test file name(s) cannot be written to submission.csv" in err, err
    for name in bad:
        assert repr(name) in err
    assert "'fine.jpg'" not in err
    # --list is verbatim: a listed name with a comma is reported, not cut at the comma
    listing = tmp_path / "list.txt"
    listing.write_text("a,b.jpg\nfine.jpg\n")
    code = main(["infer", str(test), str(tmp_path / "out"), "--model", str(model), "--list", str(listing)])
    err = capsys.readouterr().err
    assert code == 1 and "1 test file name(s)" in err and "'a,b.jpg': comma" in err
