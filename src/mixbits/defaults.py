"""Defaults of the benchmark protocol (DESIGN.md) and names the CLI offers, kept free of heavy imports."""

SOLVERS = ("rtn", "gptq", "gptaq")

# Text sources by name (mixbits.corpus): the default calibration mix (technical documentation,
# source code, quotations and dialogue, expository prose) and the evaluation domains (the
# continuity text pydoc, whose first half is in the mix, and two kinds the mix does not hold).
CALIBRATION_MIX = ("pydoc", "python", "fortunes", "jargon")
EVALUATION_DOMAINS = ("pydoc", "austen", "kjv")

EVAL_WINDOWS = 24
WINDOW_LEN = 512
# 32 x 512 = 16k tokens: H = X^T X of a 1536-wide input is well determined, and a GPTQ pass
# over the default model takes about 4 minutes on 2 cores (bench/results/calibrated.md).
CALIBRATION_WINDOWS = 32
CALIBRATION_LEN = 512
# GPTQ's treatment of the calibration Hessian (solvers.gptq.GptqSettings; bench/results/generalization.md).
GPTQ_DAMP = 0.01
GPTQ_SHRINK = 0.25
# GPTAQ: the fraction of the float model's input difference the weights absorb before GPTQ (the GPTAQ paper's alpha).
GPTAQ_ASYMMETRY = 0.25
# Block-wise tuning (solvers.tuning): signed-gradient steps per block, calibration windows per step, first step size.
TUNE_STEPS = 100
TUNE_BATCH = 4
TUNE_LR = 0.005
# Distillation of scales to the float model's logits (solvers.distill): steps over the whole model, windows per step,
# first step size (log scale), windows the result is judged on.
DISTILL_STEPS = 50
DISTILL_BATCH = 1
DISTILL_LR = 0.002
DISTILL_JUDGE = 8

# Sensitivity measurement (`mixbits plan`): the Fisher's backward pass on the first windows of the
# calibration, and the measured KL on short windows (each (group, option) reruns the blocks after it).
FISHER_WINDOWS = 8
KL_WINDOWS = 4  # one window of each source of the calibration mix (it is interleaved)
KL_LEN = 128
