"""automodel-convert: reversible MoE checkpoint conversion, expert-parallel loading and a tuned MoE model zoo."""

__version__ = "0.1.0"
