"""The `mixbits` command: a thin layer over the Python API.

User errors print one line and exit with status 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter

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
    q.add_argument("--head-format", help="format of the output head, e.g. int8:ch:sym (implies --head; default: --format; "
                                         "with a plan, outside the plan's budget)")
    q.add_argument("--embedding-format",
                   help="format of the input embedding, looked up row by row from its codes, e.g. q8_0 or int4:g64:asym "
                        "(default: 16 bits; a head tied to it computes with the same values)")
    q.add_argument("--solver", choices=defaults.SOLVERS,
                   help="rtn: round to nearest, no data; gptq: error compensation from calibration data; gptaq: "
                        "GPTQ fitted to the float model's outputs instead of the quantized model's own (GPTAQ) "
                        "(default: rtn for one --format, gptq for the options of a plan)")
    q.add_argument("--act", metavar="FORMAT",
                   help="also round every quantized layer's inputs as the model runs, e.g. int8:g32 (blocks of 32, as "
                        "llama.cpp's Q8_0: W4A8 with --format q4_0), int8:token (per token), int8:static (one scale per layer input, "
                        "measured on the calibration text) or fp8_e4m3:ch; the packed runtime then multiplies int8 "
                        "codes by weight codes (default: float inputs)")
    q.add_argument("--awq", action="store_true", help="activation-aware scaling searched on calibration data")
    q.add_argument("--tune", type=int, nargs="?", const=defaults.TUNE_STEPS, metavar="STEPS",
                   help="after the solver, tune each block's rounding and scales to the float block's output on the "
                        "calibration windows, STEPS signed-gradient steps per block (default with no number: "
                        f"{defaults.TUNE_STEPS}; off without --tune)")
    q.add_argument("--distill", type=int, nargs="?", const=defaults.DISTILL_STEPS, metavar="STEPS",
                   help="after all blocks, tune every quantized layer's scales to the float model's next-token "
                        "distributions on the calibration windows, STEPS signed-gradient steps of one window (default "
                        f"with no number: {defaults.DISTILL_STEPS}; kept only if it lowers the KL; off without "
                        "--distill)")
    q.add_argument("--smoothquant", action="store_true",
                   help="with --act, first migrate activation outliers into the weights (SmoothQuant), the strength "
                        "searched on calibration data")
    q.add_argument("--rotate", action="store_true", help="Hadamard rotation of the residual stream (families with an adapter; not gemma2/gemma3)")
    q.add_argument("--online-hadamard", action="store_true", help="with --rotate, also rotate every down_proj input at run time")
    _add_calibration_args(q)
    mixed = q.add_argument_group("mixed precision (instead of --format)")
    mixed.add_argument("--plan", help="apply a plan written by `mixbits plan`")
    _add_budget_args(mixed, required=False)
    _add_plan_args(mixed)
    mixed.add_argument("--kl-all", action="store_true",
                        help="measure the KL of every option, not only where this budget's plan depends on it "
                             "(slower; a --sensitivity file written then serves any budget)")
    mixed.add_argument("--save-plan", help="with --bpw/--size, also write the plan to this file")
    q.add_argument("--out", "-o", help="write a packed checkpoint (codes at their bit width) to this directory; "
                                        "finished blocks and measurements are kept in OUT.partial until it is "
                                        "written, so an interrupted run resumes with the same command")
    q.add_argument("--stream", action="store_true",
                   help="for a model larger than memory: read, solve and write one block at a time from --model's "
                        "safetensors shards into --out (one --format, solver gptq unless --solver; no evaluation: run "
                        "`mixbits eval OUT` after)")
    q.add_argument("--no-eval", dest="evaluate", action="store_false", help="only quantize and report bits")
    _add_eval_args(q)
    q.set_defaults(run=_run_quantize)

    p = commands.add_parser("plan", help="measure every layer under every option and allocate bits to a budget",
                            description="Measure the damage of each option on each group of tied layers, then choose "
                                        "one option per group with an exact integer program to meet the budget.")
    _add_model_args(p)
    _add_budget_args(p, required=True)
    _add_plan_args(p)
    p.add_argument("--kl-all", action="store_true",
                        help="measure the KL of every option, not only where this budget's plan depends on it "
                             "(slower; a --sensitivity file written then serves any budget)")
    p.add_argument("--solver", choices=defaults.SOLVERS, default="gptq", help="solver of options without @SOLVER (default: %(default)s)")
    _add_calibration_args(p)
    p.add_argument("--out", "-o", required=True, help="where to write the plan (JSON); measurements are kept in "
                                                       "OUT.partial until it is written, so an interrupted run "
                                                       "resumes with the same command")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_run_plan, text=None)

    k = commands.add_parser("kv-plan", help="measure each block's keys and values under each KV-cache option and "
                                            "allocate cache bits to a budget",
                            description="Measure the KL of every (block, keys or values, option) on calibration "
                                        "windows, then choose one option per block's keys and values with an exact "
                                        "integer program to meet the cache budget at --context tokens (KVTuner).")
    _add_model_args(k)
    budget = k.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=float, help="budget in mean bits per cached number (keys and values)")
    budget.add_argument("--size", help="budget as the whole cache's size at --context tokens, e.g. 40MB")
    k.add_argument("--context", type=int, default=4096, help="context length the budget counts (default: %(default)s)")
    k.add_argument("--options", help="comma-separated KV options (see `mixbits eval --kv`) (default: "
                                     + ",".join(_kv_default_options()) + ")")
    k.add_argument("--damage-file", help="reuse the measurements in this file if it exists, else write them there")
    k.add_argument("--calib-windows", type=int, default=4, help="calibration windows (default: %(default)s)")
    k.add_argument("--calib-window-len", type=int, default=2048,
                   help="tokens per calibration window: as long as the contexts served (default: %(default)s)")
    k.add_argument("--into", help="a weights plan (from `mixbits plan`) to hold the KV plan; written to --out")
    k.add_argument("--out", "-o", required=True, help="where to write the plan (JSON)")
    k.set_defaults(run=_run_kv_plan)

    s = commands.add_parser("sweep", help="quantize at a range of budgets and plot perplexity against size",
                            description="For each budget, quantize with the allocated plan and with a llama.cpp-style "
                                        "heuristic mix; also every uniform option in range. Writes a table, a PNG and an HTML page.")
    _add_model_args(s)
    s.add_argument("--bpw", required=True, help="budgets in bits per weight: START:STOP:STEP or a list, e.g. 2.25:4.5:0.25")
    s.add_argument("--series", default="allocated,heuristic,uniform", help="which series to run (default: %(default)s)")
    s.add_argument("--out", "-o", required=True, help="folder for sweep.json, sweep.md, sweep.png, sweep.html")
    _add_plan_args(s)
    s.add_argument("--solver", choices=defaults.SOLVERS, default="gptq", help="solver of options without @SOLVER (default: %(default)s)")
    _add_calibration_args(s)
    _add_eval_args(s)
    s.set_defaults(run=_run_sweep)

    e = commands.add_parser("eval", help="evaluate a model's perplexity (and KL/agreement against a reference)",
                            description="Perplexity on windows from the middle of each evaluation domain (default pydoc, austen, kjv) "
                                        "and their mean; with --reference, also KL and top-1 agreement.")
    _add_model_args(e, positional=True)
    e.add_argument("--reference", help="reference model (same sources as --model) for KL and agreement (with a "
                                       "quantized KV cache, default: the same model with its cache in full precision)")
    _add_kv_args(e)
    _add_eval_args(e)
    e.set_defaults(run=_run_eval)

    x = commands.add_parser("export", help="write a packed checkpoint for another runtime (GGUF for llama.cpp, "
                                           "compressed-tensors for vLLM)",
                            description="Write a checkpoint's quantized layers from their codes: as GGML block types "
                                        "(gguf) or compressed-tensors' packed integers (compressed-tensors); layers "
                                        "in formats the target cannot hold are an error naming what it can.")
    x.add_argument("checkpoint", help="directory written by `mixbits quantize --out`")
    x.add_argument("--to", choices=("gguf", "compressed-tensors"), default="gguf",
                   help="output format (default: %(default)s)")
    x.add_argument("--out", "-o", required=True, help="the file (gguf) or new directory (compressed-tensors) to write")
    x.add_argument("--tokenizer-gguf", help="copy the tokenizer metadata from this GGUF (default: the source model's "
                                            "GGUF when known, else converted from the checkpoint's tokenizer files)")
    x.add_argument("--debug", action="store_true", help="show tracebacks")
    x.set_defaults(run=_run_export)

    g = commands.add_parser("generate", help="generate text with a model or a packed checkpoint",
                            description="Greedy (or sampled) continuation of a prompt; prints the text and the decode speed.")
    _add_model_args(g, positional=True)
    g.add_argument("--prompt", "-p", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", "-n", type=int, default=64, help="tokens to generate (default: %(default)s)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template as a user turn")
    g.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy decoding")
    g.add_argument("--transformers", action="store_true",
                   help="decode with transformers' generate instead of mixbits' decoder (slower; for comparison)")
    _add_kv_args(g)
    g.set_defaults(run=_run_generate)

    c = commands.add_parser("corpus", help="the named text sources: list them, or fetch the Debian ones",
                            description="Text sources for calibration (the default mix) and evaluation (the domains). "
                                        "`fetch` downloads the pinned Debian packages into mixbits' cache (apt-get download; "
                                        "nothing is installed).")
    c.add_argument("action", choices=("list", "fetch"), help="list: sources, kinds, roles and state; fetch: download them")
    c.add_argument("--force", action="store_true", help="with fetch: download again even if cached")
    c.add_argument("--json", action="store_true", help="with list: print JSON")
    c.add_argument("--debug", action="store_true", help="show tracebacks")
    c.set_defaults(run=_run_corpus)

    f = commands.add_parser("formats", help="list every number format with its exact bits per weight",
                            description="Every format family, with exact bits per weight (codes, scales, zero points, "
                                        "tables) on a matrix of the given shape.")
    f.add_argument("--group", type=int, default=64, help="group size for formats that take one (default: %(default)s)")
    f.add_argument("--shape", default="1536x576", help="ROWSxCOLS of the matrix to count bits on (default: %(default)s)")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    f.add_argument("--debug", action="store_true", help="show tracebacks")
    f.set_defaults(run=_run_formats)
    return parser


def _add_model_args(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    sources = "mixbits checkpoint, Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct)"
    if positional:
        parser.add_argument("source", nargs="?", help=sources)
    parser.add_argument("--model", "-m", help=sources if not positional else "the same as SOURCE")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_calibration_args(parser) -> None:
    parser.add_argument("--calib-text", help="calibration text: a source name, file or folder; windows from its start "
                                             "(default: the calibration mix of " + ", ".join(defaults.CALIBRATION_MIX) + ")")
    parser.add_argument("--calib-windows", type=int, default=defaults.CALIBRATION_WINDOWS,
                        help="calibration windows (default: %(default)s)")
    parser.add_argument("--calib-window-len", type=int, default=defaults.CALIBRATION_LEN,
                        help="tokens per calibration window (default: %(default)s)")
    parser.add_argument("--damp", type=float, default=defaults.GPTQ_DAMP,
                        help="GPTQ: added to the Hessian's diagonal, as a fraction of its mean (default: %(default)s)")
    parser.add_argument("--shrink", type=float, default=defaults.GPTQ_SHRINK,
                        help="GPTQ: shrink the calibration Hessian toward its diagonal, H <- (1-s) H + s diag(H), "
                             "0 to 1 (default: %(default)s)")
    parser.add_argument("--asymmetry", type=float, default=defaults.GPTAQ_ASYMMETRY,
                        help="gptaq: how far toward the weights that fit the float model's outputs best (least "
                             "squares) GPTQ starts, 0 (plain GPTQ) to 1 (default: %(default)s)")


def _add_budget_args(parser, required: bool) -> None:
    budget = parser.add_mutually_exclusive_group(required=required)
    budget.add_argument("--bpw", type=float, help="budget in bits per weight (of the quantized layers; see --scope)")
    budget.add_argument("--size", help="budget as a model size, e.g. 60MB or 57.5MiB (the embedding and an untied head "
                        "allocated too; norms and biases at 32 bits, as stored)")
    parser.add_argument("--scope", choices=("layers", "model"), default="layers",
                        help="--bpw counts the quantized layers, or the whole model: then the embedding and an untied "
                             "head are allocated too, norms and biases counted at 32 bits (default: %(default)s)")


def _add_kv_args(parser) -> None:
    parser.add_argument("--kv", metavar="OPTION",
                        help="quantize the KV cache's keys and values: a scalar format, then /channel (scales per "
                             "channel over token groups), /pre-rope (keys), /rotate (Hadamard per head), /residualN "
                             "(newest N tokens in 16 bits), e.g. int4:g64:asym or int2:g32:asym/channel/residual64")
    parser.add_argument("--kv-keys", metavar="OPTION", help="the keys' option (default: --kv)")
    parser.add_argument("--kv-values", metavar="OPTION", help="the values' option (default: --kv)")
    parser.add_argument("--kv-plan", metavar="PLAN", help="per-block key and value options from a plan file's kv_cache")


def _kv_default_options() -> tuple[str, ...]:
    from .kvcache.planning import DEFAULT_OPTIONS

    return DEFAULT_OPTIONS


def _kv_request(args):
    """The KV cache asked for by --kv, --kv-keys, --kv-values or --kv-plan, checked before any model loads: a
    `KVPlan`, a (keys, values) pair of options for every block, or None."""
    from .kvcache import parse_kv
    from .plan import Plan

    if args.kv_plan:
        if args.kv or args.kv_keys or args.kv_values:
            raise MixbitsError("give --kv-plan or --kv/--kv-keys/--kv-values, not both")
        plan = Plan.load(args.kv_plan)
        if plan.kv_cache is None:
            raise MixbitsError(f"{args.kv_plan} has no kv_cache; make one with `mixbits kv-plan`")
        return plan.kv_cache
    keys, values = parse_kv(args.kv_keys or args.kv), parse_kv(args.kv_values or args.kv)
    if values is not None and values.pre_rope:
        raise MixbitsError(f"{values}: values have no rotary embedding; give pre-rope with --kv-keys only")
    return None if keys is None and values is None else (keys, values)


def _kv_layers(request, model) -> list | None:
    """Per-block (keys, values) options of `_kv_request`'s answer for `model` (checked against its blocks)."""
    from .kvcache.plan import KVPlan
    from .kvcache.planning import cache_shape

    if request is None:
        return None
    shape = cache_shape(model)
    if isinstance(request, KVPlan):
        request.check_model(shape)
        return request.layers
    for option in request:
        if option is not None:
            option.check_head_dim(shape.head_dim)
    return [request] * shape.blocks


def _add_plan_args(parser) -> None:
    from .menu import DEFAULT_OPTIONS, TARGET_OPTIONS

    parser.add_argument("--options", help="comma-separated options, FORMAT[@SOLVER] or fp16 (default: " + ",".join(DEFAULT_OPTIONS) + ")")
    parser.add_argument("--target", choices=tuple(TARGET_OPTIONS),
                        help="only options this runtime can load; gguf: llama.cpp's " + ",".join(TARGET_OPTIONS["gguf"])
                             + " (the default menu then), k-quants only where rows hold whole 256-value blocks")
    parser.add_argument("--pin", action="append", default=[], metavar="PATTERN=OPTION",
                        help="fix the option of layers matching a pattern, e.g. '*.down_proj=int4:g64:asym' (repeatable)")
    parser.add_argument("--damage", choices=("kl", "proxy"), default="kl",
                        help="what the allocator minimises: measured KL, or the Fisher-weighted proxy alone (faster) (default: %(default)s)")
    parser.add_argument("--no-ties", dest="ties", action="store_false",
                        help="let layers that read the same input (q/k/v, gate/up) take different options")
    parser.add_argument("--sensitivity", help="reuse the measurements in this file if it exists, else write them there")
    parser.add_argument("--kl-windows", type=int, default=defaults.KL_WINDOWS,
                        help="calibration windows the KL is measured on (default: %(default)s)")
    parser.add_argument("--kl-window-len", type=int, default=defaults.KL_LEN, help="tokens of each KL window (default: %(default)s)")
    parser.add_argument("--fisher-windows", type=int, default=defaults.FISHER_WINDOWS,
                        help="calibration windows of the Fisher pass (default: %(default)s)")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="measure the groups on the Ray cluster at ADDRESS (e.g. ray://head:10001 or auto), one "
                             "worker per CPU unless --workers; every node needs mixbits installed")
    parser.add_argument("--workers", type=int,
                        help="measure the groups on this many Ray workers (without --ray: a Ray cluster started on "
                             "this machine)")


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", action="append", metavar="TEXT",
                        help="evaluation domain: a text source name (see `mixbits corpus list`), a text file or a "
                             "folder; repeatable (default: " + ", ".join(defaults.EVALUATION_DOMAINS) + ")")
    parser.add_argument("--windows", type=int, default=defaults.EVAL_WINDOWS, help="evaluation windows (default: %(default)s)")
    parser.add_argument("--window-len", type=int, default=defaults.WINDOW_LEN, help="tokens per window (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")


def _plan_inputs(args, solver: str):
    """Menu and pins from the arguments, checked before any slow work."""
    from .menu import TARGET_OPTIONS, parse_menu, parse_pin

    for value, name in ((args.kl_windows, "--kl-windows"), (args.fisher_windows, "--fisher-windows")):
        if value < 1:
            raise MixbitsError(f"{name} must be at least 1, got {value}")
    if args.kl_window_len < 2:
        raise MixbitsError(f"--kl-window-len must be at least 2 tokens, got {args.kl_window_len}")
    options = args.options if args.options or not args.target else list(TARGET_OPTIONS[args.target])
    return parse_menu(options, solver), [parse_pin(text, solver) for text in args.pin]


def _check_sensitivity_path(args, created=None) -> None:
    """A --sensitivity file to write must have a folder to go in (`created`: one the command makes itself)."""
    from pathlib import Path

    if args.sensitivity and not Path(args.sensitivity).exists():
        folder = Path(args.sensitivity).parent
        if not folder.is_dir() and folder != created:
            raise MixbitsError(f"the folder {folder} of --sensitivity does not exist; create it first")


def _budget(args):
    from .allocate import Budget, parse_size

    return Budget(bits_per_weight=args.bpw, bytes=parse_size(args.size) if args.size else None, scope=args.scope)


def _sensitivity(args, loaded, menu, pins):
    """The sensitivity from --sensitivity (options of the menu it lacks measured and added), else measured now."""
    from .planning import sensitivity_for

    return sensitivity_for(loaded, menu, path=args.sensitivity, damage=args.damage, pins=pins, target=args.target,
                           **_measure_options(args))


def _measure_options(args) -> dict:
    return {
        "calibration": args.calib_text, "calibration_windows": args.calib_windows,
        "calibration_len": args.calib_window_len, "ties": args.ties, "kl_windows": args.kl_windows,
        "kl_len": args.kl_window_len, "fisher_windows": args.fisher_windows,
        "clip_search": getattr(args, "clip_search", True),  # quantize --no-clip-search: measured as it will be applied
        "gptq": _gptq_settings(args),
        "cluster": _cluster(args),
    }


def _cluster(args):
    if getattr(args, "ray", None) is None and getattr(args, "workers", None) is None:
        return None
    from .distributed import Cluster

    return Cluster(address=args.ray, workers=args.workers)


def _print_plan(plan, sensitivity) -> None:
    from collections import Counter

    from .report import format_table

    counts = Counter((layer.option, layer.solver) for layer in plan.layers)
    weights = Counter()
    for layer in plan.layers:
        weights[(layer.option, layer.solver)] += layer.weights
    print(format_table(["option", "solver", "layers", "share of weights"],
                       [[o, s, n, f"{weights[(o, s)] / plan.weights:.1%}"] for (o, s), n in sorted(counts.items())]))
    print(f"plan: {plan.bits:,} bits = {plan.bits_per_weight:.4f} bits per weight over {plan.weights:,} weights; "
          f"predicted damage {plan.damage_total:.4g} ({plan.damage})")
    seconds = sensitivity.seconds
    if seconds:
        print(f"measured in {sum(seconds.values()):.0f} s (statistics {seconds.get('statistics', 0):.0f} s, "
              f"quantizing options {seconds.get('quantize', 0):.0f} s, KL {seconds.get('kl', 0):.0f} s)")


def _partial_folder(out: str):
    """Where a command writing `out` keeps its finished steps until it has written `out` (`resume`)."""
    from pathlib import Path

    path = Path(out)
    return path.with_name(path.name + ".partial")


def _run_plan(args) -> int:
    from .models import load_model
    from .models.loader import check_source
    from .planning import plan_for_budget
    from .resume import discard

    check_source(args.model)
    menu, pins = _plan_inputs(args, args.solver)
    budget = _budget(args)
    _check_sensitivity_path(args)
    _check_calibration(args)
    loaded = load_model(args.model)
    partial = _partial_folder(args.out)
    plan, sensitivity = plan_for_budget(loaded, budget, menu, sensitivity=args.sensitivity, damage=args.damage,
                                        pins=pins, target=args.target, resume=partial, kl_all=args.kl_all,
                                        **_measure_options(args))
    plan.save(args.out)
    discard(partial)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=1))
        return 0
    _print_plan(plan, sensitivity)
    print(f"wrote {args.out}")
    return 0


def _gptq_settings(args):
    from .solvers import GptqSettings

    try:
        return GptqSettings(damp=args.damp, shrink=args.shrink, asymmetry=args.asymmetry)
    except ValueError:
        raise MixbitsError(f"--damp must be at least 0 and --shrink and --asymmetry from 0 to 1, got {args.damp}, "
                           f"{args.shrink} and {args.asymmetry}") from None


def _steps_settings(steps: int | None, flag: str, settings):
    """`settings(steps=steps)` for a --tune or --distill given STEPS; None when the flag is absent."""
    if steps is None:
        return None
    if steps < 1:
        raise MixbitsError(f"{flag} takes a number of steps of at least 1, got {steps}")
    return settings(steps=steps)


def _check_calibration(args) -> None:
    """Window counts, GPTQ settings and the calibration text (the user's, or every source of the mix), before any model loads."""
    from .corpus import resolve_text, source
    from .data import check_window_counts

    check_window_counts(args.calib_windows, args.calib_window_len)
    _gptq_settings(args)
    if args.calib_text is not None:
        resolve_text(args.calib_text)
    else:
        for name in defaults.CALIBRATION_MIX:
            source(name).text()


def _run_quantize(args) -> int:
    from .eval import evaluate_domains, load_domains
    from .formats import parse_format
    from .models import load_model
    from .models.loader import check_source
    from .plan import Plan
    from .quantize import quantize
    from .record import provenance

    # Fail on bad arguments before any slow work.
    check_source(args.model)
    if args.stream:
        return _run_streamed(args)
    planning = args.bpw is not None or args.size is not None
    if args.plan and planning:
        raise MixbitsError("give either --plan or a budget (--bpw/--size), not both")
    if args.save_plan and not planning:
        raise MixbitsError("--save-plan writes the plan made for a budget; add --bpw or --size")
    plan = Plan.load(args.plan) if args.plan else None
    if plan is not None and not plan.layers:
        raise MixbitsError(f"{args.plan} holds only a KV cache (kv_cache), no weight layers; use it with `mixbits "
                           "eval --kv-plan` or `mixbits generate --kv-plan`")
    fmt = parse_format(args.format)
    head_format = parse_format(args.head_format) if args.head_format else None
    embedding_format = parse_format(args.embedding_format) if args.embedding_format else None
    activation = None
    if args.act:
        from .activations import parse_activation

        activation = parse_activation(args.act)
    if embedding_format is not None:
        from .runtime.embedding import check_lookup_format

        check_lookup_format(embedding_format)
    if args.out:
        from .io.checkpoint import check_output_directory

        check_output_directory(args.out)
    menu = pins = budget = None
    if planning:
        menu, pins = _plan_inputs(args, args.solver or "gptq")
        budget = _budget(args)
        _check_sensitivity_path(args)
        if budget.whole_model and (embedding_format is not None or head_format is not None):
            raise MixbitsError("a budget over the whole model allocates the embedding and head itself; pin them "
                               "instead, e.g. --pin model.embed_tokens=q8_0")
    solver = args.solver or "rtn"
    texts = _eval_texts(args) if args.evaluate else None
    if args.smoothquant and not args.act:
        raise MixbitsError("SmoothQuant moves outliers out of the inputs for their quantization; give --act too")
    calibrated = (solver in ("gptq", "gptaq") or args.awq or args.smoothquant or plan is not None or planning
                  or args.tune is not None or args.distill is not None)
    from .solvers.distill import DistillSettings
    from .solvers.tuning import TuneSettings

    tune = _steps_settings(args.tune, "--tune", TuneSettings)
    distill = _steps_settings(args.distill, "--distill", DistillSettings)
    if calibrated:
        _check_calibration(args)
    loaded = load_model(args.model)
    if args.target and not planning:
        _check_gguf_target(loaded, plan, str(fmt), head_format, embedding_format)
    if texts is not None:
        domains = load_domains(loaded.tokenizer, texts, args.windows, args.window_len,
                               calibrated_on=_calibration_texts(args) if calibrated else ())
        original = copy.deepcopy(loaded.model)
    partial = _partial_folder(args.out) if args.out else None
    if planning:
        from .planning import plan_for_budget

        plan, sensitivity = plan_for_budget(loaded, budget, menu, sensitivity=args.sensitivity, damage=args.damage,
                                            pins=pins, target=args.target, resume=partial, kl_all=args.kl_all,
                                            **_measure_options(args))
        if args.save_plan:
            plan.save(args.save_plan)
        if not args.json:
            _print_plan(plan, sensitivity)
    report = quantize(
        loaded, fmt, solver=solver, awq=args.awq, smooth=args.smoothquant, rotate=args.rotate, online_hadamard=args.online_hadamard,
        calibration=args.calib_text, calibration_windows=args.calib_windows,
        calibration_len=args.calib_window_len, clip_search=args.clip_search, include_head=args.head, head_format=head_format,
        embedding_format=embedding_format, plan=plan, gptq=_gptq_settings(args), activation=activation,
        resume=partial, tune=tune, distill=distill,
    )
    saved = None
    if args.out:
        from .io.checkpoint import save_quantized
        from .resume import discard

        saved = save_quantized(loaded, report, args.out, plan=plan)
        discard(partial)
    record = provenance(loaded.name, loaded.sha256)
    record["quantization"] = report.as_dict()
    if saved is not None:
        record["checkpoint"] = saved.as_dict()
    if plan is not None:
        record["plan"] = plan.as_dict()
    if texts is not None:
        result = evaluate_domains(loaded.model, domains, reference=original)
        record["evaluation"] = result.as_dict()
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    print(f"model: {loaded.name} (sha256 {loaded.sha256[:12]})")
    print(f"quantized with {report.method}: {len(report.layers)} linear layers, {report.weights:,} weights, "
          f"{report.bits_per_weight:.4f} bits per weight, {report.seconds:.1f} s, peak memory {report.peak_memory_bytes / 2**20:.0f} MiB")
    activations = Counter(layer.activation for layer in report.layers if layer.activation)
    if activations:
        print("inputs quantized: " + ", ".join(f"{count} layers to {name}" for name, count in activations.items()))
    if report.calibration:
        c = report.calibration
        where = f"from token {c['start']}" if "start" in c else "spread over the first half of each source"
        print(f"calibration: {c['text']}, {c['count']} windows x {c['length']} tokens {where}")
    if saved is not None:
        print(f"checkpoint: {saved.path}, {sum(saved.files.values()) / 1e6:.2f} MB in all (model counted at "
              f"{report.model_bits / 8e6:.2f} MB); quantized layers {saved.quantized_bytes / 1e6:.2f} MB "
              f"({saved.quantized_bits / 8e6:.2f} MB of codes and parameters)")
        for layer in report.outer:
            print(f"  {layer.name}: {layer.option}, {layer.bits / 8e6:.2f} MB")
    if report.rotation:
        print(f"rotation: residual {report.rotation['residual']}, down_proj input {report.rotation['down_proj'] or 'none'}")
    if texts is None:
        return 0
    print(f"{report.format} {report.method} against the original model:")
    _print_domains(result)
    return 0


def _run_streamed(args) -> int:
    from pathlib import Path

    from .io.checkpoint import check_output_directory
    from .streaming import quantize_streamed

    unsupported = [flag for flag, given in (("--plan", args.plan), ("--bpw/--size", args.bpw or args.size),
                                            ("--awq", args.awq), ("--smoothquant", args.smoothquant),
                                            ("--rotate", args.rotate), ("--act", args.act), ("--head", args.head),
                                            ("--head-format", args.head_format), ("--tune", args.tune),
                                            ("--distill", args.distill)) if given]
    if unsupported:
        raise MixbitsError(f"--stream quantizes to one --format; {unsupported[0]} does not stream yet")
    if not args.out:
        raise MixbitsError("--stream writes each block to the checkpoint as it finishes; give --out DIR")
    if args.model is None or not Path(args.model).is_dir():
        raise MixbitsError("--stream reads a Hugging Face model directory of safetensors shards; give --model DIR")
    check_output_directory(args.out)
    _check_calibration(args)
    report, saved = quantize_streamed(args.model, args.out, args.format, solver=args.solver or "gptq",
                                      calibration=args.calib_text, calibration_windows=args.calib_windows,
                                      calibration_len=args.calib_window_len, clip_search=args.clip_search,
                                      gptq=_gptq_settings(args), embedding_format=args.embedding_format)
    record = {"quantization": report.as_dict(), "checkpoint": saved.as_dict()}
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    print(f"streamed {len(report.layers)} linear layers, {report.weights:,} weights, {report.bits_per_weight:.4f} "
          f"bits per weight, {report.seconds:.1f} s, peak memory {report.peak_memory_bytes / 2**20:.0f} MiB")
    print(f"checkpoint: {saved.path}, {sum(saved.files.values()) / 1e6:.2f} MB in all; evaluate it with "
          f"`mixbits eval {saved.path}`")
    return 0


def _run_sweep(args) -> int:
    from pathlib import Path

    from .allocate import Budget
    from .calibrate import calibration_data
    from .eval import load_domains, reference_scores
    from .mixes import check_budget
    from .models import load_model
    from .models.loader import check_source
    from .record import provenance
    from .report.sweep import table, write
    from .sweep import SERIES, finished_points, parse_budgets, sweep

    check_source(args.model)
    budgets = parse_budgets(args.bpw)
    series = tuple(s.strip() for s in args.series.split(",") if s.strip())
    if not series or set(series) - set(SERIES):
        raise MixbitsError(f"--series {args.series!r}: choose from {', '.join(SERIES)}")
    menu, pins = _plan_inputs(args, args.solver)
    _check_sensitivity_path(args, created=Path(args.out))
    texts = _eval_texts(args)
    _check_calibration(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # before measuring, which may write its sensitivity file there
    loaded = load_model(args.model)
    domains = load_domains(loaded.tokenizer, texts, args.windows, args.window_len, calibrated_on=_calibration_texts(args))
    calibration, calibration_record = calibration_data(loaded, args.calib_text, args.calib_windows, args.calib_window_len)
    if set(series) - {"uniform"}:
        for budget in budgets:
            check_budget(loaded.model, menu, pins, Budget(budget), args.target)
    sensitivity = _sensitivity(args, loaded, menu, pins)
    record = provenance(loaded.name, loaded.sha256)
    record.update(domains=[d.describe() for d in domains], calibration=calibration_record,
                  budgets=budgets, damage=args.damage, options=[str(c) for c in menu], pins=args.pin,
                  sensitivity_seconds=sensitivity.seconds, rank_correlation=sensitivity.rank_correlation(), points=[])
    record["points"] = finished_points(Path(args.out) / "sweep.json", record)
    if record["points"]:
        print(f"sweep: resuming {args.out} ({len(record['points'])} points kept)", file=sys.stderr)
    references = reference_scores(loaded.model, domains)
    record["fp32_perplexity"] = {d.name: r.perplexity for d, r in zip(domains, references)}
    title = f"{loaded.name}: perplexity against bits per weight"

    def done(point):
        record["points"].append(point.as_dict())
        write(record, args.out, title)  # after every point, so an interrupted sweep keeps what it measured
        unseen = "" if point.delta_unseen is None else f", unseen kinds {point.delta_unseen:+.1%}"
        print(f"{point.series:9} {point.label:24} {point.bits_per_weight:.4f} bpw  mean Δ ppl "
              f"{point.delta_perplexity:+.1%}{unseen}", file=sys.stderr)

    sweep(loaded, sensitivity, menu, budgets, domains, series=series, damage=args.damage, pins=pins,
          calibration=calibration, references=references, skip={(p["series"], p["label"]) for p in record["points"]},
          on_point=done, gptq=_gptq_settings(args))
    print(table(record["points"]))
    print(f"wrote {args.out}/sweep.{{json,md,png,html}}")
    return 0


def _run_eval(args) -> int:
    from .eval import evaluate_domains, load_domains
    from .models import load_model
    from .models.loader import check_source
    from .record import provenance

    texts = _eval_texts(args)
    kv_request = _kv_request(args)
    source = _source(args)
    check_source(source)
    if args.reference:
        check_source(args.reference)
    loaded = load_model(source)
    reference = load_model(args.reference) if args.reference else None
    domains = load_domains(loaded.tokenizer, texts, args.windows, args.window_len, **_checkpoint_calibration(source))
    kv = _kv_layers(kv_request, loaded.model)
    record = provenance(loaded.name, loaded.sha256)
    if kv is None:
        result = evaluate_domains(loaded, domains, reference=reference)
    else:
        from .eval.domains import reference_scores
        from .kvcache.fake import fake_quantized_kv

        against = reference_scores((reference or loaded).model, domains)  # before the cache is quantized
        with fake_quantized_kv(loaded.model, kv):
            result = evaluate_domains(loaded, domains, reference=against)
        record["kv_cache"] = [{"block": i, "keys": str(k or "none"), "values": str(v or "none")}
                              for i, (k, v) in enumerate(kv)]
    if reference is not None:
        record["reference"] = {"name": reference.name, "sha256": reference.sha256}
    record["evaluation"] = result.as_dict()
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    print(f"model: {loaded.name} (sha256 {loaded.sha256[:12]})")
    if reference is not None:
        print(f"reference: {reference.name} (sha256 {reference.sha256[:12]})")
    elif kv is not None:
        print("reference: the same model with its KV cache in full precision")
    if kv is not None:
        kinds = sorted({(str(k or "none"), str(v or "none")) for k, v in kv})
        print("KV cache: " + "; ".join(f"keys {k}, values {v}" for k, v in kinds[:3])
              + (f" (and {len(kinds) - 3} more pairs)" if len(kinds) > 3 else ""))
    _print_domains(result)
    return 0


def _checkpoint_calibration(source) -> dict:
    """load_domains' calibrated_on for a mixbits checkpoint, from what its quantization recorded; {} otherwise.

    Models from elsewhere, and calibration on token ids, keep the default (the mix's sources count as seen),
    since nothing says what they saw.
    """
    from .calibrate import calibrated_texts
    from .io.checkpoint import checkpoint_info, is_checkpoint

    if source is None or not is_checkpoint(source):
        return {}
    texts = calibrated_texts((checkpoint_info(source).get("quantization") or {}).get("calibration"))
    return {} if texts is None else {"calibrated_on": texts}


def _calibration_texts(args) -> tuple[str, ...]:
    """Names of the texts calibration draws from: the mix's sources, or the one --calib-text."""
    from .corpus import CALIBRATION_MIX, resolve_text

    return CALIBRATION_MIX if args.calib_text is None else (resolve_text(args.calib_text).name,)


def _eval_texts(args) -> list:
    """The evaluation texts named by --text (default: the evaluation domains), read before any model loads."""
    from .corpus import resolve_text
    from .data import check_window_counts

    check_window_counts(args.windows, args.window_len)
    return [resolve_text(spec) for spec in (args.text or defaults.EVALUATION_DOMAINS)]


def _print_domains(result) -> None:
    from .eval.domains import HEADERS
    from .report import format_table

    for domain in result.domains:
        w = domain.spec
        print(f"{domain.name} ({domain.kind}; sha256 {domain.text.sha256[:12]}): "
              f"{w.count} windows x {w.length} tokens from token {w.start}")
    print(format_table(HEADERS, result.rows()))


def _check_gguf_target(loaded, plan, fmt: str, head_format, embedding_format=None) -> None:
    """Refuse, before quantizing, a format or plan llama.cpp cannot load (gguf is the only --target)."""
    from .io.gguf import ggml_type_name
    from .models.structure import output_head, quantizable_linears

    if plan is not None:
        layers = [(layer.option, tuple(layer.shape)) for layer in plan.layers]
    else:
        layers = [(fmt, tuple(linear.weight.shape)) for _, linear in quantizable_linears(loaded.model)]
    head = output_head(loaded.model)
    if head_format is not None and head is not None:
        layers.append((str(head_format), tuple(head[1].weight.shape)))
    embed = loaded.model.get_input_embeddings()
    if embedding_format is not None and embed is not None:
        layers.append((str(embedding_format), tuple(embed.weight.shape)))
    for option, shape in layers:
        ggml_type_name(option, shape)  # raises with the reason and the nearest type


def _run_export(args) -> int:
    from pathlib import Path

    from .io.gguf import export_gguf

    out = Path(args.out)
    if args.to == "compressed-tensors":
        from .io.compressed_tensors import export_compressed_tensors

        if out.exists():
            raise MixbitsError(f"{out} exists; give a new directory to write the compressed-tensors model to")
        path = export_compressed_tensors(args.checkpoint, out)
        print(f"wrote {path} ({sum(p.stat().st_size for p in path.iterdir()) / 1e6:.1f} MB)")
        return 0
    if out.exists() and out.is_dir():
        raise MixbitsError(f"{out} is a directory; give the GGUF file to write, e.g. {out / 'model.gguf'}")
    path = export_gguf(args.checkpoint, out, tokenizer_gguf=args.tokenizer_gguf)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _source(args) -> str | None:
    if args.source and args.model and args.source != args.model:
        raise MixbitsError(f"two models given ({args.source} and --model {args.model}); give one")
    return args.source or args.model


def _run_kv_plan(args) -> int:
    from .allocate import parse_size
    from .data import check_window_counts
    from .kvcache import parse_kv
    from .kvcache.planning import cache_shape, kv_damage, plan_kv
    from .kvcache.plan import KVBudget, check_budget
    from .models import load_model
    from .models.loader import check_source
    from .plan import Plan

    check_source(args.model)
    options = [parse_kv(text) for text in (args.options.split(",") if args.options else _kv_default_options())]
    if any(option is None for option in options):
        raise MixbitsError("--options lists quantized options only; the model's precision is always a choice")
    budget = KVBudget(args.context, args.bits, None if args.size is None else parse_size(args.size))
    weights = Plan.load(args.into) if args.into else None
    check_window_counts(args.calib_windows, args.calib_window_len)
    loaded = load_model(args.model)
    shape = cache_shape(loaded.model)
    check_budget(shape, options, budget)  # before the measurement, not after
    damage = kv_damage(loaded, options, args.calib_windows, args.calib_window_len, args.damage_file,
                       progress=lambda done, total: print(f"measured block {done}/{total}", file=sys.stderr))
    kv = plan_kv(loaded, budget, options, damage)
    plan = Plan(weights.layers if weights else [], weights.model if weights else
                {"name": loaded.name, "sha256": loaded.sha256}, weights.budget if weights else {},
                weights.damage if weights else "kl", kv)
    plan.save(args.out)
    bits = kv.cache_bits(shape)
    numbers = 2 * shape.blocks * shape.numbers(args.context)
    print(f"KV plan: {bits / 8 / 1e6:.2f} MB at {args.context} tokens ({bits / numbers:.3f} bits per cached number; "
          f"the model's precision: {shape.model_bits * numbers / 8 / 1e6:.2f} MB), predicted KL {kv.damage:.4f}")
    for index, (keys, values) in enumerate(kv.layers):
        print(f"  block {index:3}: keys {keys or 'none'}, values {values or 'none'}")
    print(f"wrote {args.out}")
    return 0


def _run_generate(args) -> int:
    import time

    from .models import load_model
    from .models.loader import check_source
    from .runtime.decode import generate

    if args.max_new_tokens < 1:
        raise MixbitsError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    kv_request = _kv_request(args)
    check_source(_source(args))
    loaded = load_model(_source(args))
    kv = _kv_layers(kv_request, loaded.model)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise MixbitsError(f"{loaded.name} has no tokenizer; generate needs one (save the model with its tokenizer)")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise MixbitsError("this tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    start = time.perf_counter()
    new, runtime = generate(loaded.model, ids, args.max_new_tokens, eos, args.sample, args.transformers,
                            note=lambda text: print(f"note: {text}", file=sys.stderr), kv=kv)
    seconds = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    print(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s, prompt {ids.shape[1]} tokens "
          f"included; {runtime})", file=sys.stderr)
    return 0


def _run_corpus(args) -> int:
    from .corpus import SOURCES, fetch_all
    from .errors import TextError
    from .report import format_table

    if args.action == "fetch":
        for package, version in fetch_all(force=args.force):
            print(f"{package} {version}: fetched")
    rows = []
    for name, source in SOURCES.items():
        role = [r for r, names in (("calibration", defaults.CALIBRATION_MIX), ("evaluation", defaults.EVALUATION_DOMAINS))
                if name in names]
        try:
            text = source.text()
            state, digest, size = "ready", text.sha256, len(text.text)
        except TextError as error:
            state, digest, size = str(error), None, None
        rows.append({**source.describe(), "roles": role, "state": state, "sha256": digest, "characters": size})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(format_table(["source", "kind", "roles", "characters", "sha256", "origin"],
                       [[r["name"], r["kind"], ", ".join(r["roles"]) or "—", r["characters"],
                         r["sha256"][:12] if r["sha256"] else "not fetched", r["origin"]] for r in rows]))
    missing = [r for r in rows if r["state"] != "ready"]
    if missing:
        print(f"{len(missing)} sources not ready: {missing[0]['state']}")
    return 0


def _run_formats(args) -> int:
    from .errors import FormatError
    from .formats import catalog
    from .report import format_table

    from .formats.granularity import MAX_GROUP

    if not 1 <= args.group <= MAX_GROUP:
        raise FormatError(f"group size must be 1 to {MAX_GROUP}, got {args.group}")
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
        if fmt.granularity.kind != "channel" or cols % fmt.vector_size == 0  # rows that cut into whole vectors
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
