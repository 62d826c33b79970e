"""The text sources, the calibration mix's recipe and multi-domain evaluation.

The Debian sources are fetched by `make setup` (`mixbits corpus fetch`).
A byte-level tokenizer (one token per UTF-8 byte) stands in for a model's,
so the recipe is checked without loading a model.
"""

import hashlib
import struct
import zlib

import pytest
import torch

from mixbits import defaults
from mixbits.cli import main
from mixbits.corpus import SOURCES, calibration_mix, resolve_text, spread_windows
from mixbits.corpus.rdata import read_lazyload
from mixbits.data import eval_windows, tokenize
from mixbits.errors import TextError


class ByteTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_sources_read_as_their_recorded_hashes_and_known_texts():
    austen = SOURCES["austen"].text().text
    assert "It is a truth universally acknowledged, that a single man in possession\nof a good fortune" in austen
    # The six novels in the package's order (its Persuasion has no title line: its first sentence stands in).
    openings = ["EMMA\n", "MANSFIELD PARK\n", "NORTHANGER ABBEY\n", "Sir Walter Elliot, of Kellynch Hall",
                "PRIDE AND PREJUDICE\n", "SENSE AND SENSIBILITY\n"]
    places = [austen.find(opening) for opening in openings]
    assert places[0] == 0 and places == sorted(places)
    kjv = SOURCES["kjv"].text().text
    assert "In the beginning God created the heaven and the earth." in kjv
    assert "The grace of our Lord Jesus Christ be with you all. Amen." in kjv
    assert "\n1 In the beginning" not in kjv  # verse numbers dropped
    fortunes = SOURCES["fortunes"].text().text
    assert "\b" not in fortunes and "\n%\n" not in fortunes
    assert "hacker" in SOURCES["jargon"].text().text
    for name in ("fortunes", "jargon", "austen", "kjv"):
        text = SOURCES[name].text()
        assert text.sha256 == hashlib.sha256(text.text.encode()).hexdigest() == SOURCES[name].sha256


def test_calibration_mix_is_deterministic_and_follows_the_recipe():
    tokenizer = ByteTokenizer()
    windows, record = calibration_mix(tokenizer, 10, 256)
    again, record_again = calibration_mix(tokenizer, 10, 256)
    assert torch.equal(windows, again) and record == record_again
    assert record["windows_sha256"] == hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    assert [s["name"] for s in record["sources"]] == list(defaults.CALIBRATION_MIX)
    assert [s["windows"] for s in record["sources"]] == [3, 3, 2, 2]  # 10 over 4 sources, the first take one more
    # Interleaved: window k of the mix is window k // 4 of source k % 4 while every source has one.
    firsts = [s["starts"][0] for s in record["sources"]]
    for i, source in enumerate(record["sources"]):
        tokens = tokenize(SOURCES[source["name"]].text(), tokenizer)
        assert torch.equal(windows[i], tokens[firsts[i]:firsts[i] + 256])
        assert source["starts"][0] == 0 and source["starts"][-1] == len(tokens) // 2 - 256  # spread over the first half


def test_calibration_windows_never_overlap_evaluation_windows_of_any_source():
    tokenizer = ByteTokenizer()
    windows, record = calibration_mix(tokenizer, 8, 512)
    for source in record["sources"]:
        tokens = tokenize(SOURCES[source["name"]].text(), tokenizer)
        _, spec = eval_windows(tokens, defaults.EVAL_WINDOWS, defaults.WINDOW_LEN)
        assert all(start + 512 <= spec.start for start in source["starts"])
        # Brute force on the contents: no 64-token run of a calibration window occurs in the evaluation span.
        evaluation = bytes(tokens[spec.start:spec.start + defaults.EVAL_WINDOWS * defaults.WINDOW_LEN].tolist())
        for start in source["starts"]:
            calib = bytes(tokens[start:start + 512].tolist())
            assert not any(calib[i:i + 64] in evaluation for i in range(0, 512 - 64, 64))


def test_too_short_or_missing_sources_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(TextError, match="need 4096; ask for fewer or shorter windows"):
        spread_windows(torch.arange(1000), 4, 512, "tiny")
    with pytest.raises(TextError, match="at least 4 windows"):
        calibration_mix(ByteTokenizer(), 3, 64)
    with pytest.raises(TextError, match="unknown text source|does not exist"):
        resolve_text("no-such-source")
    monkeypatch.setenv("MIXBITS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(TextError, match=r"not fetched; run `mixbits corpus fetch`"):
        SOURCES["austen"].text()


def test_missing_sources_fail_in_the_cli_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXBITS_CACHE", str(tmp_path / "empty-cache"))  # a model load would rebuild the GGUF cache here
    assert main(["eval", "--text", "kjv"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "mixbits corpus fetch" in message
    assert main(["quantize", "--solver", "gptq", "--no-eval"]) == 2
    assert "mixbits corpus fetch" in capsys.readouterr().err
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("gguf-*"))


def _serialize(strings: list[str]) -> bytes:
    """R's XDR serialization (version 2) of a character vector, written from R's documented layout."""
    out = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + struct.pack(">ii", 16, len(strings))
    for s in strings:
        raw = s.encode()
        out += struct.pack(">ii", 0x00040009, len(raw)) + raw
    return out


def test_r_lazyload_reader_on_a_hand_written_data_base(tmp_path):
    import gzip

    book = _serialize(["Chapter 1", "", "It was a dark night."])
    entry = struct.pack(">I", len(book)) + zlib.compress(book)
    (tmp_path / "Rdata.rdb").write_bytes(entry)
    # The index: list(variables = list(book = c(0L, len)), references = list(), compressed = TRUE)
    index = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300)
    index += struct.pack(">ii", 19 | (1 << 9), 3)
    index += struct.pack(">ii", 19 | (1 << 9), 1) + struct.pack(">iiii", 13, 2, 0, len(entry))
    index += _names_attribute(["book"])
    index += struct.pack(">ii", 19, 0)
    index += struct.pack(">iii", 10, 1, 1)
    index += _names_attribute(["variables", "references", "compressed"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert read_lazyload(tmp_path) == {"book": ["Chapter 1", "", "It was a dark night."]}
    (tmp_path / "Rdata.rdb").write_bytes(entry[:len(entry) // 2])
    with pytest.raises(TextError, match="reinstall the package"):
        read_lazyload(tmp_path)


def _names_attribute(names: list[str]) -> bytes:
    out = struct.pack(">i", 2 | (1 << 10)) + struct.pack(">ii", 1, 0x00040009) + struct.pack(">i", 5) + b"names"
    out += struct.pack(">ii", 16, len(names))
    for n in names:
        out += struct.pack(">ii", 0x00040009, len(n)) + n.encode()
    return out + struct.pack(">i", 254)


def test_evaluation_on_domains_equals_each_domain_scored_alone(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixbits.eval import evaluate_domains, load_domains, score_windows

    class Modulo(ByteTokenizer):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [b % 64 for b in text.encode()]}

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model, reference = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    (tmp_path / "notes.txt").write_text("some notes of mine. " * 40)
    domains = load_domains(Modulo(), ["pydoc", str(tmp_path / "notes.txt")], windows=2, window_len=32)
    assert [d.in_calibration for d in domains] == [True, False] and domains[1].kind == "user text"
    # Calibrated on the user's file instead (--calib-text): that file is the seen one, pydoc is not.
    own = load_domains(Modulo(), ["pydoc", str(tmp_path / "notes.txt")], windows=2, window_len=32,
                       calibrated_on=(str(tmp_path / "notes.txt"),))
    assert [d.in_calibration for d in own] == [False, True]
    result = evaluate_domains(model, domains, reference)
    deltas = []
    for domain, got in zip(domains, result.results):
        alone = score_windows(model, domain.windows, reference, progress=False)
        assert got.perplexity == pytest.approx(alone.perplexity) and got.kl == pytest.approx(alone.kl)
        deltas.append(alone.perplexity / alone.reference_perplexity - 1)
    record = result.as_dict()
    assert record["mean"]["delta_perplexity"] == pytest.approx(sum(deltas) / 2)
    assert record["mean_unseen"]["delta_perplexity"] == pytest.approx(deltas[1])
    assert record["domains"][0]["text_sha256"] == SOURCES["pydoc"].text().sha256
