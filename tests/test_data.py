import hashlib

import pytest
import torch

from mixbits.data import calibration_windows, eval_windows, load_text
from mixbits.errors import TextError


def test_default_text_is_pydoc_topics_joined_in_key_order():
    from pydoc_data.topics import topics

    text = load_text()
    assert text.name == "pydoc_data.topics"
    assert text.text.startswith(topics[sorted(topics)[0]])
    assert text.sha256 == hashlib.sha256(text.text.encode()).hexdigest()
    assert load_text().sha256 == text.sha256


def test_eval_windows_start_halfway_and_do_not_overlap_calibration():
    tokens = torch.arange(100)
    windows, spec = eval_windows(tokens, 3, 10)
    assert spec.start == 50
    assert windows[0].tolist() == list(range(50, 60))
    assert windows[2].tolist() == list(range(70, 80))
    calib, _ = calibration_windows(tokens, 5, 10)
    assert calib.max().item() < spec.start


def test_too_short_text_says_how_much_is_needed():
    with pytest.raises(TextError, match="need 120"):
        eval_windows(torch.arange(100), 3, 20)
    with pytest.raises(TextError, match="need at least 120"):
        calibration_windows(torch.arange(100), 3, 20)
    with pytest.raises(TextError, match="at least 1 window"):
        eval_windows(torch.arange(100), 0, 20)


def test_folder_text_joins_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / ".hidden").write_text("skipped")
    assert load_text(tmp_path).text == "first\n\nsecond"


def test_bad_text_sources(tmp_path):
    with pytest.raises(TextError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TextError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(TextError, match="not UTF-8"):
        load_text(tmp_path / "binary.txt")
