"""mixbits: post-training quantization of PyTorch models to an exact bit budget.

    import mixbits
    loaded = mixbits.load_model()                     # SmolLM2-135M-Instruct
    report = mixbits.quantize(loaded, "int4:g64:asym")
    print(report.bits_per_weight)
    print(mixbits.evaluate(loaded).perplexity)
"""

from .errors import MixbitsError
from .eval import Evaluation, ReferenceScores, evaluate
from .formats import parse_format
from .models import LoadedModel, load_model
from .quantize import QuantizationReport, quantize

__version__ = "0.1.0"

__all__ = [
    "Evaluation",
    "LoadedModel",
    "MixbitsError",
    "QuantizationReport",
    "ReferenceScores",
    "__version__",
    "evaluate",
    "load_model",
    "parse_format",
    "quantize",
]
