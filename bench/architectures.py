"""Which features run on which architecture: a tiny random model of every family, each feature tried.

For each family with an adapter (mixture-of-experts ones with four experts,
two per token), and GPT-NeoX and GPT-2, which have none,
the script builds a two-block model from its transformers config
(`models.tiny`) and runs: GPTQ int4 with a quantized embedding, save and
load (the loaded logits must equal the fake-quantized model's); AWQ (scales
searched for int3 and folded into the float model, whose function must
stay); the rotation (the same); the fast decoder (its greedy tokens must
equal those of transformers' forward, step by step; whether
`model.generate` agrees is said); GGUF export (read back by the gguf
package). A cell says "yes" only when the check held; otherwise the
one-line reason mixbits gave.

    python bench/architectures.py
"""

from __future__ import annotations

import copy
import tempfile
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


def quantize_save_load(model, scratch: Path) -> str:
    report = mixbits.quantize(model, "int4:g32:asym", solver="gptq", calibration=CALIBRATION,
                              embedding_format="int8:g32:sym", progress=False)
    save_quantized(model, report, scratch / "ckpt")
    loaded = load_quantized(scratch / "ckpt").model
    return check(torch.allclose(logits(loaded), logits(model), atol=1e-4, rtol=1e-4), "loaded logits differ")


def awq(model, scratch: Path) -> str:
    from mixbits.formats import parse_format
    from mixbits.transforms.scaling import scale_model

    before = logits(model)
    scale_model(model, CALIBRATION, parse_format("int3:g16:asym"))
    return check((logits(model) - before).abs().max() < 1e-4, "logits moved")


def rotation(model, scratch: Path) -> str:
    from mixbits.transforms.rotation import rotate

    before = logits(model)
    rotate(model, online_down=True)
    return check((logits(model) - before).abs().max() < 1e-4, "logits moved")


def decoder(model, scratch: Path) -> str:
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


def gguf_export(model, scratch: Path) -> str:
    import gguf

    from mixbits.io.gguf import export_gguf
    from mixbits.models.loader import default_gguf_path

    report = mixbits.quantize(model, "q4_0", progress=False)
    save_quantized(model, report, scratch / "export")
    path = export_gguf(scratch / "export", scratch / "model.gguf", tokenizer_gguf=default_gguf_path())
    return check(len(gguf.GGUFReader(str(path)).tensors) > 0, "empty file")


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
                    row[feature] = run(copy.deepcopy(base), Path(scratch))
                except MixbitsError as error:
                    row[feature] = f"no: {str(error).splitlines()[0]}"
        results.append(row)
        rows.append([row["family"], row["adapter"], *(row[f] for f in FEATURES)])
        print(" | ".join(rows[-1]), flush=True)
    record = provenance("tiny random models (mixbits.models.tiny)", "")
    record["results"] = results
    header = ("# Features per architecture\n\n`python bench/architectures.py`: a two-block random model of each "
              "family from its transformers config. \"yes\" means the feature ran and its check held (loaded logits "
              "equal the fake-quantized model's; AWQ and rotation keep the float function; the decoder's greedy "
              "tokens equal those of transformers' forward; the GGUF reads back); otherwise mixbits' one-line reason.\n")
    write_results("architectures", record, header + "\n" + format_table(["family", "adapter", *FEATURES], rows))


if __name__ == "__main__":
    main()
