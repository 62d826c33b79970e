"""Defaults of the benchmark protocol (DESIGN.md) and names the CLI offers, kept free of heavy imports."""

SOLVERS = ("rtn", "gptq")

EVAL_WINDOWS = 24
WINDOW_LEN = 512
# 32 x 512 = 16k tokens: H = X^T X of a 1536-wide input is well determined, and a GPTQ pass
# over the default model takes about 4 minutes on 2 cores (bench/results/calibrated.md).
CALIBRATION_WINDOWS = 32
CALIBRATION_LEN = 512

# Sensitivity measurement (`mixbits plan`): the Fisher's backward pass on the first windows of the
# calibration, and the measured KL on short windows (each (group, option) reruns the blocks after it).
FISHER_WINDOWS = 8
KL_WINDOWS = 2
KL_LEN = 128
