"""compressed-tensors export of a packed checkpoint: the Hugging Face layout vLLM and transformers load.

The output directory is the checkpoint's model as a Hugging Face model
(config.json with a `quantization_config`, tokenizer files, safetensors)
whose quantized Linears are written in compressed-tensors' layouts, from the
stored codes and scales, with no rounding of their own:

- `pack-quantized` (W4A16, W8A16, and any integer weights of 1 to 8 bits with
  float or integer inputs): `weight_packed`, the codes as unsigned values
  (signed code + 2^(bits-1)) in one little-endian bit stream per row, in
  int32 words (mixbits' own packing, `packing`, is the same stream);
  `weight_scale` [rows, groups] in the stored scale dtype; `weight_shape`; and
  for asymmetric formats `weight_zero_point` packed the same way along rows.
  compressed-tensors dequantizes (q - z) * s with q and z in the signed range,
  which is mixbits' (c - z) * s with both shifted by 2^(bits-1).
- `int-quantized` for 8-bit weights with int8 inputs (W8A8): `weight` as int8
  and `weight_scale`.

Each distinct (format, input format) is one of the config's groups, its
targets the layers' names, so an allocated plan's mix exports as it is.
Inputs quantized to `int8:token` are written as compressed-tensors' dynamic
per-token int8; other input formats are refused (`int8:g32`, for one, is not a
scheme vLLM runs). Weights need integer formats whose scales are one float
per group (fp16, bf16 or fp32) and whose groups tile the rows; float
minimums (Q4_1, Q4_K), two-level scales and non-integer formats are refused
in one line. Layers kept at 16 bits are written as float16 and listed in
`ignore` (with float inputs: an input format on them is not written), as is
the embedding, written dense: as stored if 16-bit, else dequantized to
float32 (exactly the values mixbits computes with). A head tied to it stays
tied and computes in float there (its `head_activation` is not written).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..activations import parse_activation
from ..errors import ExportError, MixbitsError
from ..formats import parse_format
from ..formats.granularity import ungroup
from ..formats.integer import IntFormat
from ..formats.storage import restore
from ..packing import pack
from ..plan import KEEP
from .checkpoint import FLOAT, INFO, MANIFEST, QUANTIZED, layer_tensors, read_checkpoint

SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WORD = 32  # bits of compressed-tensors' packing words


def export_compressed_tensors(directory: str | Path, out: str | Path) -> Path:
    """Write the checkpoint in `directory` as a compressed-tensors model directory `out`; returns `out`."""
    from safetensors.torch import save_file

    directory, out = Path(directory), Path(out)
    if out.exists():
        raise ExportError(f"{out} exists; choose a new output directory")
    contents = read_checkpoint(directory)
    info, quantized = contents.info, contents.quantized
    tensors: dict[str, torch.Tensor] = dict(contents.floats)
    groups: dict[tuple[str, str | None], list[str]] = {}
    ignore = []
    for layer in info["layers"]:
        name, shape, option = layer["name"], tuple(layer["shape"]), layer["option"]
        stored = layer_tensors(quantized, name)
        if option == KEEP:
            tensors[f"{name}.weight"] = stored["weight"].half()
            ignore.append(name)
            continue
        activation = layer.get("activation")  # checked by read_checkpoint
        fmt = _checked_format(name, option, shape, activation)
        tensors.update({f"{name}.{key}": value for key, value in _layer(fmt, shape, stored, activation).items()})
        groups.setdefault((option, activation), []).append(name)
    for layer in info.get("outer", []):
        name, shape, option = layer["name"], tuple(layer["shape"]), layer["option"]
        stored = contents.layers[name]
        tensors[f"{name}.weight"] = stored if option == KEEP else stored.dequantize().float()
        ignore.append(name)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))  # checked by read_checkpoint
    config["quantization_config"] = _quantization_config(groups, ignore)

    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary / "model.safetensors"),
                  metadata={"format": "pt"})
        (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in directory.iterdir():  # tokenizer and generation files as the checkpoint holds them
            if path.name not in (INFO, MANIFEST, QUANTIZED, FLOAT, "config.json"):
                shutil.copy2(path, temporary / path.name)
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out


def _checked_format(name: str, option: str, shape: tuple[int, int], activation: str | None) -> IntFormat:
    fmt = parse_format(option)
    if not isinstance(fmt, IntFormat) or fmt.min is not None or fmt.scale.name not in SCALE_DTYPES:
        raise ExportError(f"{name} is {option}: compressed-tensors holds integer codes with one fp16, bf16 or fp32 "
                          "scale per group (and integer zero points); re-quantize it, e.g. int4:g128:asym or int8:ch:sym")
    if fmt.granularity.kind == "tensor" or (fmt.granularity.kind == "group" and shape[1] % fmt.granularity.size):
        raise ExportError(f"{name} is {option}: its groups must tile its {shape[1]} inputs (or use per-channel scales)")
    try:
        found = None if activation is None else parse_activation(activation)
    except MixbitsError as error:
        raise ExportError(f"{name}'s activation: {error}") from None
    if found is not None and str(found) != str(parse_activation("int8:token")):
        raise ExportError(f"{name} quantizes its inputs to {activation}: compressed-tensors (and vLLM) run integer "
                          "inputs as dynamic per-token int8; quantize with --act int8:token")
    return fmt


def _layer(fmt: IntFormat, shape: tuple[int, int], stored: dict[str, torch.Tensor], activation: str | None) -> dict:
    """One layer's compressed-tensors tensors from its stored codes and parameters."""
    rows, cols = shape
    quantized = restore(fmt, shape, stored)
    bits = fmt.bits_per_code
    half = 2 ** (bits - 1)
    codes = ungroup(quantized.codes, shape).to(torch.int16)  # signed if symmetric, else 0 .. 2^bits - 1
    scale = quantized.params["scale"].reshape(rows, -1).to(SCALE_DTYPES[fmt.scale.name])
    out = {"weight_scale": scale}
    if bits == 8 and activation is not None:  # int-quantized: the int8 codes themselves
        out["weight"] = (codes if fmt.symmetric else codes - half).to(torch.int8)
    else:
        out["weight_packed"] = _packed_rows(codes + half if fmt.symmetric else codes, bits)
        out["weight_shape"] = torch.tensor([rows, cols])
    if not fmt.symmetric:
        zero = quantized.params["zero"].reshape(rows, -1).to(torch.int16)  # unsigned, as the codes
        if "weight" in out:
            out["weight_zero_point"] = (zero - half).to(torch.int8)
        else:  # packed along rows: one stream per group column
            out["weight_zero_point"] = _packed_rows(zero.T.contiguous(), bits).T.contiguous()
    return out


def _packed_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [R, C] below 2^bits as int32 [R, ceil(C * bits / 32)]: each row one little-endian bit stream."""
    rows, cols = values.shape
    padded = -(-cols // WORD) * WORD  # whole words per row, as compressed-tensors pads
    full = torch.zeros(rows, padded, dtype=torch.int16)
    full[:, :cols] = values
    words = pack(full, bits).view(torch.int32).reshape(rows, padded * bits // WORD)
    return words[:, :-(-cols * bits // WORD)].contiguous()


def _quantization_config(groups: dict[tuple[str, str | None], list[str]], ignore: list[str]) -> dict:
    config_groups, formats = {}, set()
    for index, ((option, activation), names) in enumerate(groups.items()):
        fmt = parse_format(option)
        weights = {"num_bits": fmt.bits_per_code, "type": "int", "symmetric": fmt.symmetric, "dynamic": False,
                   "strategy": "channel" if fmt.granularity.kind == "channel" else "group",
                   "group_size": None if fmt.granularity.kind == "channel" else fmt.granularity.size}
        inputs = None if activation is None else {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                                  "strategy": "token", "group_size": None}
        form = "int-quantized" if fmt.bits_per_code == 8 and activation is not None else "pack-quantized"
        formats.add(form)
        config_groups[f"group_{index}"] = {"targets": names, "weights": weights, "input_activations": inputs,
                                           "output_activations": None, "format": form}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
            "kv_cache_scheme": None}
