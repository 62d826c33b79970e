"""GGUF export of a packed checkpoint, for llama.cpp and other GGML runtimes.

Layers whose option is one of GGML's block types are written bit for bit
from the checkpoint's stored codes and parameters, so llama.cpp dequantizes
exactly the weights mixbits computed with:

    q8_0 = int8:g32:sym            Q8_0: fp16 d, 32 int8
    q4_0 = int4:g32:sym            Q4_0: fp16 d, 16 bytes of (code + 8) nibbles
    q4_1 = int4:g32:asym:min=fp16  Q4_1: fp16 d, fp16 m, 16 bytes of nibbles
    q4_k = int4:g32:asym:scale=u6s8:min=u6s8   Q4_K: per 256: fp16 d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes
    q6_k = int6:g16:sym:scale=i8s16            Q6_K: per 256: 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, fp16 d
    mxfp4                          MXFP4: E8M0 exponent, 16 bytes of E2M1 nibbles
    fp16 (kept)                    F16

K-quants need rows that are whole 256-value super-blocks. The embedding (an
outer layer of the checkpoint) is written the same way, from its codes or
its 16-bit values; a head tied to it is not written (llama.cpp reuses
token_embd), except where llama.cpp's architecture requires an output
tensor. Other tensors (norms, biases, routers; the embedding of a version 1
checkpoint) are written as float32, as the model holds them, or as Q8_0
where that holds them exactly (an embedding from a Q8_0 GGUF). Everything
the architecture changes is the adapter's (`models.adapter`): llama.cpp's
architecture and metadata, rows permuted where GGML's layout differs
(q_proj and k_proj's rotary pairs, and their biases, for llama), norms
stored otherwise (Gemma's 1 + w), experts stacked per projection (one type
for all experts of one), and tensors llama.cpp computes from (Llama 3's
rotary factors); configurations llama.cpp would compute otherwise are
refused in one line. The tokenizer's metadata is copied from the GGUF the model
came from when that file is known, else converted from the Hugging Face
tokenizer files in the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError, MixbitsError
from ..formats import parse_format
from ..hashing import sha256_file
from ..models.registry import adapter_for, exportable_types
from ..packing import unpack
from ..plan import KEEP
from .checkpoint import layer_tensors, read_checkpoint

GGML_FORMATS = {name: parse_format(name) for name in ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "mxfp4")}
SUPER_BLOCK = 256


def ggml_type_name(option: str, shape: tuple[int, int]) -> str:
    """The GGML type of a layer's option ("q4_k", ..., "f16"), or an ExportError naming the nearest one."""
    if option == KEEP:
        return "f16"
    fmt = parse_format(option)
    for name, ggml in GGML_FORMATS.items():
        if fmt == ggml:
            if shape[1] % 32:
                raise ExportError(f"GGML's blocks are 32 values of a row; this layer's rows have {shape[1]}, so it "
                                  "can only be exported in 16 bits (fp16)")
            if name in ("q4_k", "q6_k") and shape[1] % SUPER_BLOCK:
                raise ExportError(f"{option} ({name}) needs rows of whole {SUPER_BLOCK}-value super-blocks, this layer's "
                                  f"rows have {shape[1]} values; use q4_0, q4_1 or q8_0 for it")
            return name
    bits = fmt.bits_per_weight(*shape)

    def distance(name: str) -> tuple:  # same family, then code width, then symmetry, then size
        ggml = GGML_FORMATS[name]
        return (type(ggml) is not type(fmt), abs(ggml.code_bits - fmt.code_bits),
                getattr(ggml, "symmetric", None) != getattr(fmt, "symmetric", None), abs(ggml.bits_per_weight(*shape) - bits))

    fitting = [name for name in GGML_FORMATS if name not in ("q4_k", "q6_k") or shape[1] % SUPER_BLOCK == 0]
    nearest = min(fitting, key=distance)
    raise ExportError(f"{option} has no GGML type; the nearest is {nearest} ({GGML_FORMATS[nearest]}, "
                      f"{GGML_FORMATS[nearest].bits_per_weight(*shape):.2f} bpw); quantize with --target gguf")


def gguf_representable(option: str, shape: tuple[int, int]) -> bool:
    try:
        ggml_type_name(option, shape)
    except ExportError:
        return False
    return True


def export_gguf(directory: str | Path, out: str | Path, *, tokenizer_gguf: str | Path | None = None) -> Path:
    """Write the checkpoint in `directory` as a GGUF file `out` (atomically); returns the path."""
    import gguf

    directory, out = Path(directory), Path(out)
    contents = read_checkpoint(directory)
    info, config = contents.info, contents.config
    adapter = adapter_for(config)
    arch = adapter.gguf_architecture(config)
    if arch is None:
        raise ExportError(f"GGUF export has no writer for {config.model_type!r} models yet (it writes: "
                          f"{', '.join(exportable_types())}); use the mixbits checkpoint")
    layers = {layer["name"]: layer for layer in info["layers"] + info.get("outer", [])}
    adapter.gguf_check(config, set(layers))
    types = {name: ggml_type_name(layer["option"], tuple(layer["shape"])) for name, layer in layers.items()}
    quantized, floats = contents.quantized, contents.floats
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tensors = _tensors(adapter, config, info, layers, types, quantized, floats, names)

    temporary = out.with_name(out.name + f".tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(temporary), arch)
    try:
        _add_metadata(writer, adapter, config, info, directory, tokenizer_gguf)
        for name, (data, raw_type) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, out)
    except BaseException:
        try:
            writer.close()
        except Exception:  # the writer may not have opened its file yet
            pass
        temporary.unlink(missing_ok=True)
        raise
    return out


def _tensors(adapter, config, info: dict, layers: dict, types: dict, quantized: dict, floats: dict, names) -> dict:
    """Every GGUF tensor by name: (data, GGML type or None for float data as given)."""
    tensors: dict[str, tuple[np.ndarray, object]] = {}
    for name, tensor in floats.items():
        if name in info["tied"]:
            continue  # a tied copy: llama.cpp reuses token_embd (where it takes an output at all, it is added below)
        base = name.rpartition(".")[0]
        order = adapter.row_permutation(base, tensor.shape[0], config) if base in layers else None
        data, raw_type = _float_tensor(tensor if order is None else tensor[order])
        tensors[_gguf_name(names, name)] = (adapter.gguf_tensor(name, data, raw_type, config), raw_type)
    stacked: dict[str, dict[int, tuple[np.ndarray, object]]] = {}
    for name, layer in layers.items():
        order = adapter.row_permutation(name, layer["shape"][0], config)
        data, raw_type = _blocks(types[name], layer, layer_tensors(quantized, name), order)
        for module, rows, expert in adapter.gguf_pieces(name, layer["shape"][0], config):
            piece = adapter.gguf_tensor(module + ".weight", data if rows is None else data[rows], raw_type, config)
            if expert is None:
                tensors[_gguf_name(names, module + ".weight")] = (piece, raw_type)
            else:
                stacked.setdefault(_gguf_name(names, module + ".weight"), {})[expert] = (piece, raw_type, name)
    for name, experts in stacked.items():
        kinds = {raw_type for _, raw_type, _ in experts.values()}
        if len(kinds) > 1 or sorted(experts) != list(range(len(experts))):
            first = experts[min(experts)][2]
            raise ExportError(f"llama.cpp stacks the experts of {name} in one tensor of one type, but {first} and "
                              "its siblings were quantized differently; give every expert of a projection one option")
        tensors[name] = (np.stack([experts[e][0] for e in sorted(experts)]), kinds.pop())
    if adapter.gguf_output_required(config) and "output.weight" not in tensors:  # a tied head, written as a copy
        tensors["output.weight"] = tensors["token_embd.weight"]
    for name, values in adapter.gguf_extra_tensors(config).items():
        tensors[name] = (values, None)
    return tensors


def _float_tensor(tensor: torch.Tensor) -> tuple[np.ndarray, object]:
    """A tensor kept in float: as Q8_0 blocks when that holds its values exactly (an embedding that came from a
    Q8_0 GGUF, as the default model's did, takes 2 bytes per value less), else float32."""
    import gguf

    values = tensor.float().numpy()
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    if values.ndim == 2 and values.shape[1] % 32 == 0:
        blocks = gguf.quants.quantize(values, q8_0)
        if np.array_equal(gguf.quants.dequantize(blocks, q8_0), values):
            return blocks, q8_0
    return values, None


def _gguf_name(names, name: str) -> str:
    base, _, suffix = name.rpartition(".")
    mapped = names.get_name(base)
    if mapped is None:
        raise ExportError(f"no GGUF name for tensor {name}; only the architecture's standard modules can be exported")
    return f"{mapped}.{suffix}"


def _blocks(kind: str, layer: dict, stored: dict[str, torch.Tensor], order: torch.Tensor | None) -> tuple[np.ndarray, object]:
    """GGML block bytes [rows, bytes per row] of one layer (rows in `order` if given), and its GGML type."""
    import gguf

    rows, cols = layer["shape"]
    if kind == "f16":
        weight = stored["weight"] if order is None else stored["weight"][order]
        return weight.numpy(), None
    fmt = parse_format(layer["option"])
    codes = unpack(stored["codes"], fmt.code_bits, rows * cols).reshape(rows, cols).to(torch.int16)
    if order is not None:
        codes = codes[order]
    groups = rows * fmt.granularity.groups_per_row(cols)

    def per_block(key: str) -> torch.Tensor:  # a stored per-group parameter as [rows, blocks, bytes]
        return _rows(stored[key], rows, order).reshape(rows, -1, 1).contiguous()

    if kind == "q8_0":  # codes are stored offset by 128
        blocks = [per_block("scale.value").view(torch.uint8), (codes - 128).to(torch.int8).reshape(rows, -1, 32).view(torch.uint8)]
    elif kind == "q4_0":  # stored offset by 8: GGML's nibbles exactly
        blocks = [per_block("scale.value").view(torch.uint8), _nibbles(codes, 32)]
    elif kind == "q4_1":
        blocks = [per_block("scale.value").view(torch.uint8), per_block("min.value").view(torch.uint8), _nibbles(codes, 32)]
    elif kind == "mxfp4":
        blocks = [per_block("scale.value"), _nibbles(codes, 32)]
    elif kind == "q4_k":
        supers = cols // SUPER_BLOCK
        scales = _unpack_rows(stored["scale.value"], 6, groups, rows, order).reshape(rows, supers, 8)
        minimums = _unpack_rows(stored["min.value"], 6, groups, rows, order).reshape(rows, supers, 8)
        q = codes.reshape(rows, supers, 4, 2, 32)  # byte 32i + p holds value 64i + p (low) and 64i + 32 + p (high)
        packed = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, supers, 128).to(torch.uint8)
        blocks = [per_block("scale.block").view(torch.uint8), per_block("min.block").view(torch.uint8),
                  _k_scales(scales, minimums), packed]
    elif kind == "q6_k":
        supers = cols // SUPER_BLOCK
        q = codes.reshape(rows, supers, 2, 4, 32)  # [half, chunk, position]; codes stored offset by 32
        low = (q & 0xF).reshape(rows, supers, 2, 2, 2, 32)  # chunk = 2 * nibble + byte half
        ql = (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(rows, supers, 128)
        high = q >> 4
        qh = (high[:, :, :, 0] | (high[:, :, :, 1] << 2) | (high[:, :, :, 2] << 4) | (high[:, :, :, 3] << 6))
        steps = (_unpack_rows(stored["scale.value"], 8, groups, rows, order) - 128).to(torch.int8).reshape(rows, supers, 16)
        blocks = [ql.to(torch.uint8), qh.reshape(rows, supers, 64).to(torch.uint8), steps.view(torch.uint8),
                  per_block("scale.block").view(torch.uint8)]
    else:  # pragma: no cover - ggml_type_name admits only the kinds above
        raise ExportError(f"no block writer for {kind}")
    data = torch.cat(blocks, dim=2).reshape(rows, -1).contiguous().numpy()
    return data, getattr(gguf.GGMLQuantizationType, kind.upper())


def _rows(tensor: torch.Tensor, rows: int, order: torch.Tensor | None) -> torch.Tensor:
    tensor = tensor.reshape(rows, -1)
    return tensor if order is None else tensor[order]


def _unpack_rows(data: torch.Tensor, width: int, count: int, rows: int, order: torch.Tensor | None) -> torch.Tensor:
    return _rows(unpack(data, width, count).to(torch.int16), rows, order)


def _nibbles(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Blocks of `block` 4-bit values: byte j holds value j (low nibble) and value j + block/2 (high)."""
    rows = codes.shape[0]
    q = codes.reshape(rows, -1, 2, block // 2)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).to(torch.uint8)


def _k_scales(scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """Q4_K's 12 bytes of eight 6-bit scales and eight 6-bit minimums per super-block."""
    sc, mn = scales.to(torch.int16), minimums.to(torch.int16)
    first = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    second = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    third = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return torch.cat([first, second, third], dim=-1).to(torch.uint8)


def _add_metadata(writer, adapter, config, info: dict, directory: Path, tokenizer_gguf) -> None:
    import gguf

    source = info.get("source") or {}
    writer.add_name(str(source.get("name") or directory.name))
    adapter.gguf_metadata(writer, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    reference = Path(tokenizer_gguf) if tokenizer_gguf else _source_gguf(source)
    if reference is not None:
        _copy_tokenizer(writer, reference)
    else:
        _convert_tokenizer(writer, directory, config)


def _source_gguf(source: dict) -> Path | None:
    """The default model's GGUF, if the checkpoint was made from it (its tokenizer metadata is then exact)."""
    from ..models.loader import default_gguf_path

    try:
        path = default_gguf_path()
    except MixbitsError:
        return None
    return path if source.get("sha256") and sha256_file(path) == source["sha256"] else None


def _copy_tokenizer(writer, reference: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(reference))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)


def _convert_tokenizer(writer, directory: Path, config) -> None:
    import gguf

    try:
        vocab = gguf.BpeVocab(directory)
    except (FileNotFoundError, ValueError) as error:
        raise ExportError(f"cannot convert the tokenizer in {directory} ({error}); pass a GGUF to copy it from "
                          "(--tokenizer-gguf)") from None
    tokens, scores, kinds = zip(*vocab.all_tokens())
    kinds = list(kinds)
    special = _special_ids(directory)
    for index in special:
        if index < len(kinds):
            kinds[index] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(kinds)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _special_ids(directory: Path) -> list[int]:
    try:
        decoder = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))["added_tokens_decoder"]
        return [int(index) for index, token in decoder.items() if token.get("special")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no special tokens we can read: none marked
        return []
