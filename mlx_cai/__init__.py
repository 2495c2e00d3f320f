"""mlx-cai: Constitutional AI (SL-CAI, RL-AIF with DPO, evaluation) on Apple's MLX."""

__version__ = "0.1.0"
