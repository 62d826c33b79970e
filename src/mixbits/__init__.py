"""mixbits: post-training quantization of PyTorch models to an exact bit budget.

    import mixbits
    loaded = mixbits.load_model()                     # SmolLM2-135M-Instruct
    report = mixbits.quantize(loaded, "int4:g64:asym")
    print(report.bits_per_weight)
    print(mixbits.evaluate(loaded).perplexity)     # on pydoc; evaluate_domains: pydoc, austen, kjv

Mixed precision to a budget:

    plan, sensitivity = mixbits.plan_for_budget(loaded, mixbits.Budget(3.0), sensitivity="sens.json")
    plan.save("plan.json")                           # sens.json: measured once, reused (and extended) after
    mixbits.quantize(loaded, plan=plan)

A packed checkpoint, and the model back from it:

    report = mixbits.quantize(loaded, "int4:g128:asym", solver="gptq")
    mixbits.save_quantized(loaded, report, "smollm2-int4")
    model = mixbits.load_quantized("smollm2-int4").model
    tokens, runtime = mixbits.generate(model, ids, 64)  # mixbits' decoder, or transformers' where it cannot run
"""

from .allocate import Budget
from .errors import MixbitsError
from .eval import Evaluation, ReferenceScores, evaluate, evaluate_domains
from .formats import parse_format
from .io.checkpoint import load_quantized, save_quantized
from .models import LoadedModel, load_model
from .measure import measure
from .sensitivity import Sensitivity
from .menu import parse_menu
from .mixes import allocated_plan, heuristic_plan, uniform_plan
from .plan import Plan
from .planning import plan_for_budget, sensitivity_for
from .quantize import QuantizationReport, quantize
from .runtime.decode import generate

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Evaluation",
    "LoadedModel",
    "MixbitsError",
    "Plan",
    "QuantizationReport",
    "ReferenceScores",
    "Sensitivity",
    "__version__",
    "allocated_plan",
    "evaluate",
    "evaluate_domains",
    "generate",
    "heuristic_plan",
    "load_model",
    "load_quantized",
    "measure",
    "parse_format",
    "parse_menu",
    "plan_for_budget",
    "quantize",
    "save_quantized",
    "sensitivity_for",
    "uniform_plan",
]
