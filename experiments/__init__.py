"""Entry points (hydra and argparse apps) and what they produce.

- `foresight-experts`: scripted-expert success per task family, and task videos (experiments.experts)
- `foresight-bench SUITE`: speed and memory measurements (experiments.bench)
"""
