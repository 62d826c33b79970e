"""The `mixbits` command: a thin layer over the Python API.

User errors print one line and exit with status 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

from . import defaults
from .errors import MixbitsError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except MixbitsError as error:
        if args.debug:
            raise
        print(f"mixbits: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mixbits: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixbits", description="Post-training quantization to an exact bit budget.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    q = commands.add_parser("quantize", help="quantize a model and evaluate it against the original",
                            description="Quantize every Linear in the transformer blocks, then compare with the original.")
    _add_model_args(q)
    q.add_argument("--format", "-f", default="int4:g64:asym",
                   help="number format, e.g. int4:g128:asym, int3:g64:sym, int8:ch:sym (default: %(default)s)")
    q.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                   help="round with the full range instead of searching the clipping ratio per group")
    q.add_argument("--head", action="store_true", help="quantize the output head too (untied from the embedding)")
    q.add_argument("--solver", choices=defaults.SOLVERS, default="rtn",
                   help="rtn: round to nearest, no data; gptq: error compensation from calibration data (default: %(default)s)")
    q.add_argument("--awq", action="store_true", help="activation-aware scaling searched on calibration data")
    q.add_argument("--rotate", action="store_true", help="Hadamard rotation of the residual stream (LLaMA-style models)")
    q.add_argument("--online-hadamard", action="store_true", help="with --rotate, also rotate every down_proj input at run time")
    q.add_argument("--calib-text", help="calibration text file or folder; windows come from its start (default: --text)")
    q.add_argument("--calib-windows", type=int, default=defaults.CALIBRATION_WINDOWS,
                   help="calibration windows for gptq/awq (default: %(default)s)")
    q.add_argument("--calib-window-len", type=int, default=defaults.CALIBRATION_LEN,
                   help="tokens per calibration window (default: %(default)s)")
    q.add_argument("--no-eval", dest="evaluate", action="store_false", help="only quantize and report bits")
    _add_eval_args(q)
    q.set_defaults(run=_run_quantize)

    e = commands.add_parser("eval", help="evaluate a model's perplexity (and KL/agreement against a reference)",
                            description="Perplexity on windows from the middle of the text; with --reference, also KL and top-1 agreement.")
    _add_model_args(e)
    e.add_argument("--reference", help="reference model (same sources as --model) for KL and agreement")
    _add_eval_args(e)
    e.set_defaults(run=_run_eval)

    f = commands.add_parser("formats", help="list every number format with its exact bits per weight",
                            description="Every format family, with exact bits per weight (codes, scales, zero points, "
                                        "tables) on a matrix of the given shape.")
    f.add_argument("--group", type=int, default=64, help="group size for formats that take one (default: %(default)s)")
    f.add_argument("--shape", default="1536x576", help="ROWSxCOLS of the matrix to count bits on (default: %(default)s)")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    f.add_argument("--debug", action="store_true", help="show tracebacks")
    f.set_defaults(run=_run_formats)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", help="text file or folder (default: CPython's pydoc topics)")
    parser.add_argument("--windows", type=int, default=defaults.EVAL_WINDOWS, help="evaluation windows (default: %(default)s)")
    parser.add_argument("--window-len", type=int, default=defaults.WINDOW_LEN, help="tokens per window (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")


def _run_quantize(args) -> int:
    from .data import check_window_counts, eval_windows, load_text, tokenize
    from .eval import score_windows
    from .formats import parse_format
    from .models import load_model
    from .quantize import quantize
    from .record import provenance
    from .report import format_table

    # Fail on bad arguments before any slow work.
    fmt = parse_format(args.format)
    text = None
    if args.evaluate:
        check_window_counts(args.windows, args.window_len)
        text = load_text(args.text)
    loaded = load_model(args.model)
    if text is not None:
        windows, spec = eval_windows(tokenize(text, loaded.tokenizer), args.windows, args.window_len)
        original = copy.deepcopy(loaded.model)
    calibrated = args.solver == "gptq" or args.awq
    if calibrated:
        check_window_counts(args.calib_windows, args.calib_window_len)
    report = quantize(
        loaded, fmt, solver=args.solver, awq=args.awq, rotate=args.rotate, online_hadamard=args.online_hadamard,
        calibration=args.calib_text or args.text, calibration_windows=args.calib_windows,
        calibration_len=args.calib_window_len, clip_search=args.clip_search, include_head=args.head,
    )
    record = provenance(loaded.name, loaded.sha256, text and text.name, text and text.sha256)
    record["quantization"] = report.as_dict()
    if text is not None:
        result = score_windows(loaded.model, windows, reference=original)
        result.windows = spec
        record["evaluation"] = result.as_dict()
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    print(f"model: {loaded.name} (sha256 {loaded.sha256[:12]})")
    print(f"quantized with {report.method}: {len(report.layers)} linear layers, {report.weights:,} weights, "
          f"{report.bits_per_weight:.4f} bits per weight, {report.seconds:.1f} s, peak memory {report.peak_memory_bytes / 2**20:.0f} MiB")
    if report.calibration:
        c = report.calibration
        print(f"calibration: {c['text']}, {c['windows']} windows x {c['length']} tokens from token {c.get('start', 0)}")
    if report.rotation:
        print(f"rotation: residual {report.rotation['residual']}, down_proj input {report.rotation['down_proj'] or 'none'}")
    if text is None:
        return 0
    print(f"text: {text.name} (sha256 {text.sha256[:12]}), {spec.count} windows x {spec.length} tokens from token {spec.start}")
    delta = result.perplexity / result.reference_perplexity - 1
    print(format_table(
        ["model", "bpw", "perplexity", "Δ ppl", "KL", "top-1 agree"],
        [["fp32", 32.0, result.reference_perplexity, None, None, None],
         [f"{report.format} {report.method}", report.bits_per_weight, result.perplexity, f"{delta:+.2%}", result.kl, result.agreement]],
    ))
    return 0


def _run_eval(args) -> int:
    from .data import check_window_counts, load_text
    from .eval import evaluate
    from .models import load_model
    from .record import provenance
    from .report import format_table

    check_window_counts(args.windows, args.window_len)
    text = load_text(args.text)
    loaded = load_model(args.model)
    reference = load_model(args.reference) if args.reference else None
    result = evaluate(loaded, text, reference=reference, windows=args.windows, window_len=args.window_len)
    record = provenance(loaded.name, loaded.sha256, result.text_name, result.text_sha256)
    if reference is not None:
        record["reference"] = {"name": reference.name, "sha256": reference.sha256}
    record["evaluation"] = result.as_dict()
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    spec = result.windows
    print(f"model: {loaded.name} (sha256 {loaded.sha256[:12]})")
    print(f"text: {result.text_name} (sha256 {result.text_sha256[:12]}), {spec.count} windows x {spec.length} tokens from token {spec.start}")
    rows = [["model", result.perplexity, None, None]]
    if reference is not None:
        rows = [["reference", result.reference_perplexity, None, None], ["model", result.perplexity, result.kl, result.agreement]]
    print(format_table(["", "perplexity", "KL", "top-1 agree"], rows))
    return 0


def _run_formats(args) -> int:
    from .errors import FormatError
    from .formats import catalog
    from .report import format_table

    if args.group < 1:
        raise FormatError(f"group size must be at least 1, got {args.group}")
    try:
        rows, cols = (int(n) for n in args.shape.lower().split("x"))
        if rows < 1 or cols < 1:
            raise ValueError
    except ValueError:
        raise FormatError(f"--shape must look like 1536x576 (rows x cols), got {args.shape!r}") from None
    entries = [
        {"format": str(fmt), "code_bits": fmt.code_bits, "bits": fmt.bits(rows, cols),
         "bits_per_weight": fmt.bits_per_weight(rows, cols)}
        for fmt in catalog(args.group)
    ]
    if args.json:
        print(json.dumps({"shape": [rows, cols], "group": args.group, "formats": entries}, indent=1))
        return 0
    print(f"exact bits per weight on a {rows}x{cols} matrix (codes + scales + zero points + tables)")
    print(format_table(["format", "code bits", "bits per weight"],
                       [[e["format"], e["code_bits"], round(e["bits_per_weight"], 4)] for e in entries]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
