"""Which features run on which architecture: a tiny random model of every family, each feature tried.

For each family with an adapter (mixture-of-experts ones with four experts,
two per token), and GPT-NeoX and GPT-2, which have none,
the script builds a two-block model from its transformers config
(`models.tiny`) and runs: GPTQ int4 with a quantized embedding, save and
load (the loaded logits must equal the fake-quantized model's); AWQ (scales
searched for int3 and folded into the float model, whose function must
stay); the rotation (the same); the fast decoder (its greedy tokens must
equal those of transformers' forward, step by step; whether
`model.generate` agrees is said); GGUF export (q8_0, read back by the gguf
package; with LLAMA_CPP_BIN set, llama.cpp's llama-perplexity runs the
file, on a model of the default tokenizer's vocabulary with peaked output
distributions, and its next-token distributions must match the quantized
model's: mean KL below 0.001 nats). A cell says "yes" only when the check held; otherwise the
one-line reason mixbits gave.

    python bench/architectures.py
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

import mixbits
from mixbits.errors import MixbitsError
from mixbits.io.checkpoint import load_quantized, save_quantized
from mixbits.models.registry import adapter_for
from mixbits.models.tiny import FAMILIES, MOE_FAMILIES, tiny_model
from mixbits.record import provenance
from mixbits.report import format_table

from common import write_results

PROMPT = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(3))
CALIBRATION = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(4))


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def logits(model):
    return logits_of(model, PROMPT)


def check(condition: bool, what: str) -> str:
    return "yes" if condition else f"no: {what}"


def quantize_save_load(model, scratch: Path, family: str) -> str:
    report = mixbits.quantize(model, "int4:g32:asym", solver="gptq", calibration=CALIBRATION,
                              embedding_format="int8:g32:sym", progress=False)
    save_quantized(model, report, scratch / "ckpt")
    loaded = load_quantized(scratch / "ckpt").model
    return check(torch.allclose(logits(loaded), logits(model), atol=1e-4, rtol=1e-4), "loaded logits differ")


def awq(model, scratch: Path, family: str) -> str:
    from mixbits.formats import parse_format
    from mixbits.transforms.scaling import scale_model

    before = logits(model)
    scale_model(model, CALIBRATION, parse_format("int3:g16:asym"))
    return check((logits(model) - before).abs().max() < 1e-4, "logits moved")


def rotation(model, scratch: Path, family: str) -> str:
    from mixbits.transforms.rotation import rotate

    before = logits(model)
    rotate(model, online_down=True)
    return check((logits(model) - before).abs().max() < 1e-4, "logits moved")


def decoder(model, scratch: Path, family: str) -> str:
    from mixbits.runtime.decode import Decoder

    tokens = Decoder(model).generate(PROMPT[0], 12)
    ids = PROMPT
    for _ in range(12):  # greedy by transformers' full forward, step by step
        ids = torch.cat([ids, logits_of(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    if not torch.equal(tokens, ids[0]):
        return "no: tokens differ from transformers' forward"
    if not torch.equal(tokens, model.generate(PROMPT, max_new_tokens=12, do_sample=False)[0]):
        return "yes (transformers' own generate differs from its forward here)"
    return "yes"


def gguf_export(model, scratch: Path, family: str) -> str:
    """Export q8_0 and read the file back; with llama.cpp (LLAMA_CPP_BIN), run it on a model of the default
    tokenizer's vocabulary (llama.cpp needs one token per embedding row) and compare its next-token distributions
    with the quantized model's own."""
    import os

    import gguf

    from mixbits.io.gguf import export_gguf
    from mixbits.models.loader import default_gguf_path

    if family not in {**FAMILIES, **MOE_FAMILIES}:  # no adapter: the export says why it cannot write one
        report = mixbits.quantize(model, "q8_0", progress=False)
        save_quantized(model, report, scratch / "export")
        path = export_gguf(scratch / "export", scratch / "model.gguf", tokenizer_gguf=default_gguf_path())
        return check(bool(gguf.GGUFReader(str(path)).tensors), "empty file")
    model = tiny_model(family, vocab_size=VOCAB)
    with torch.no_grad():  # peaked next-token distributions, so that any error in the function shows
        for matrix in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            matrix.mul_(20)
    report = mixbits.quantize(model, "q8_0", progress=False)
    save_quantized(model, report, scratch / "export")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_gguf(scratch / "export", scratch / "model.gguf", tokenizer_gguf=default_gguf_path())
    note = "; ".join(str(w.message) for w in caught)
    if not gguf.GGUFReader(str(path)).tensors:
        return "no: empty file"
    if not os.environ.get("LLAMA_CPP_BIN"):
        return "yes (read back; llama.cpp not run: set LLAMA_CPP_BIN)"
    kl, agreement = llama_cpp_against(model, path, scratch)
    verdict = check(kl < 1e-3, f"llama.cpp's distributions differ (KL {kl:.3g})")
    return f"{verdict} (llama.cpp: KL {kl:.1e}, top-1 {agreement:.1%}{'; ' + note if note else ''})"


VOCAB = 49152  # the default model's tokenizer, whose GGUF metadata the exports borrow
CONTEXT = 64  # within every tiny model's sliding window: llama.cpp runs mistral and phi3 with full attention


def _coded(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities as llama-perplexity codes them: 16 bits over the 16 nats below the largest, everything
    further down set to that floor. Both sides coded alike, so the comparison sees only the logits' differences."""
    top = logits.amax(-1, keepdim=True)
    floor = torch.maximum(logits.amin(-1, keepdim=True), top - 16)
    total = torch.log(torch.exp(logits - top).double().sum(-1, keepdim=True)).float()
    scale = (top - floor) / 65535
    codes = torch.where(logits > floor, torch.round((logits - floor) / scale), 0)
    return floor - top - total + scale * codes


def llama_cpp_version() -> str | None:
    import os
    import subprocess

    if not os.environ.get("LLAMA_CPP_BIN"):
        return None
    found = subprocess.run([str(Path(os.environ["LLAMA_CPP_BIN"]) / "llama-perplexity"), "--version"],
                           capture_output=True, text=True)
    return (found.stdout + found.stderr).strip().splitlines()[0]


def llama_cpp_against(model, path: Path, scratch: Path) -> tuple[float, float]:
    """Mean KL(llama.cpp || mixbits) of the next-token distributions, and top-1 agreement, on llama-perplexity's
    chunks of a text (its --kl-divergence-base file holds the tokens and its log-probabilities, 16-bit coded)."""
    import inspect
    import os
    import subprocess
    import textwrap

    import numpy as np

    text = scratch / "text.txt"
    text.write_text(inspect.getsource(textwrap)[:6000])
    base = scratch / "llama.kld"
    subprocess.run([str(Path(os.environ["LLAMA_CPP_BIN"]) / "llama-perplexity"), "-m", str(path), "-f", str(text),
                    "-c", str(CONTEXT), "-b", str(CONTEXT), "--chunks", "8", "-t", "2", "--kl-divergence-base",
                    str(base)], check=True, capture_output=True)
    raw = base.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw[8:20], dtype=np.int32)
    tokens = np.frombuffer(raw[20:20 + 4 * n_chunk * n_ctx], dtype=np.int32).reshape(n_chunk, n_ctx)
    first, width = n_ctx // 2, 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(raw[20 + 4 * n_chunk * n_ctx:], dtype=np.uint16).reshape(n_chunk, n_ctx - 1 - first, width)
    header = rows[..., :4].copy().view(np.float32)  # per row: scale, minimum log-probability
    theirs = torch.from_numpy(header[..., 1:2] + header[..., 0:1] * rows[..., 4:4 + n_vocab].astype(np.float32))
    with torch.no_grad():
        ours = _coded(model(torch.from_numpy(tokens.astype(np.int64))).logits[:, first:n_ctx - 1].float())
    theirs, ours = torch.log_softmax(theirs.double(), -1), torch.log_softmax(ours.double(), -1)
    kl = float((theirs.exp() * (theirs - ours)).sum(-1).mean())
    agreement = float((theirs.argmax(-1) == ours.argmax(-1)).double().mean())
    return kl, agreement


FEATURES = {"quantize, save, load": quantize_save_load, "AWQ": awq, "rotation": rotation, "fast decoder": decoder,
            "GGUF export": gguf_export}


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=96, max_position_embeddings=128)).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()


def main() -> None:
    builders = {family: (lambda f=family: tiny_model(f)) for family in {**FAMILIES, **MOE_FAMILIES}}
    builders["gpt_neox (no adapter)"] = gpt_neox
    builders["gpt2 (no adapter)"] = gpt2
    rows, results = [], []
    for family, build in builders.items():
        base = build()
        row = {"family": family, "adapter": adapter_for(base).name}
        for feature, run in FEATURES.items():
            with tempfile.TemporaryDirectory() as scratch:
                try:
                    row[feature] = run(copy.deepcopy(base), Path(scratch), family)
                except MixbitsError as error:
                    row[feature] = f"no: {str(error).splitlines()[0]}"
        results.append(row)
        rows.append([row["family"], row["adapter"], *(row[f] for f in FEATURES)])
        print(" | ".join(rows[-1]), flush=True)
    record = provenance("tiny random models (mixbits.models.tiny)", "")
    record["results"] = results
    record["llama_cpp"] = llama_cpp_version()
    header = ("# Features per architecture\n\n`python bench/architectures.py`: a two-block random model of each "
              "family from its transformers config. \"yes\" means the feature ran and its check held (loaded logits "
              "equal the fake-quantized model's; AWQ and rotation keep the float function; the decoder's greedy "
              "tokens equal those of transformers' forward; the GGUF reads back and, run by llama.cpp (8 chunks of 64 tokens of "
              "textwrap.py's source, llama-perplexity's --kl-divergence-base), gives next-token distributions within "
              "a mean KL of 0.001 nats (llama.cpp quantizes activations to 8 bits; both sides coded as llama-perplexity codes its log-probabilities) of the quantized model's); otherwise mixbits' one-line reason.\n")
    write_results("architectures", record, header + "\n" + format_table(["family", "adapter", *FEATURES], rows))


if __name__ == "__main__":
    main()
