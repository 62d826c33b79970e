import hashlib

import pytest
import torch

from mixbits.data import bos_token_id, calibration_windows, eval_windows, load_text
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


def letter_tokenizer(adds_bos: bool):
    """A tokenizers-backed tokenizer of single letters, with BOS id 0, adding it or not."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    tokenizer.add_bos_token = adds_bos
    return tokenizer


def test_windows_of_a_model_that_takes_a_bos_start_with_it():
    assert bos_token_id(letter_tokenizer(True)) == 0
    assert bos_token_id(letter_tokenizer(False)) is None
    tokens = torch.arange(10, 110)
    windows, spec = eval_windows(tokens, 3, 10, bos=0)
    assert windows[:, 0].tolist() == [0, 0, 0]
    assert windows[:, 1:].reshape(-1).tolist() == list(range(60, 87))  # 9 text tokens each, from the middle on
    assert spec.as_dict() == {"count": 3, "length": 10, "start": 50, "bos_token_id": 0}
    calib, calib_spec = calibration_windows(tokens, 5, 10, bos=0)
    assert calib.shape == (5, 10) and calib[:, 0].eq(0).all()
    assert calib[:, 1:].reshape(-1).tolist() == list(range(10, 55))
    assert "bos_token_id" not in eval_windows(tokens, 3, 10)[1].as_dict()  # records without a BOS are unchanged


def test_a_bos_window_scores_its_text_tokens_as_transformers_does():
    """The BOS is never a target: perplexity equals exp of transformers' own loss on the same windows."""
    import math

    from transformers import LlamaConfig, LlamaForCausalLM

    from mixbits.eval.metrics import score_windows

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    windows, _ = eval_windows(torch.randint(1, 64, (200,), generator=torch.Generator().manual_seed(2)), 4, 16, bos=0)
    result = score_windows(model, windows, progress=False)
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    assert result.predictions == 4 * 15
    assert math.isclose(result.perplexity, math.exp(loss.item()), rel_tol=1e-5)
