"""Hardware-aware planning: one (method, rank, bits) choice per layer under a target's budgets.

sensitivity.py (what calibration data says about each layer) -> candidates.py and options.py (each
layer's options and their prices) -> costs.py, memory.py (latency, RAM) -> probe.py (measured
losses) -> pricing.py (price once, solve for any budget; solver.py the knapsack) -> plan.py (the
plan file, and applying it) -> pipeline.py (plan, apply, check, write) and pareto.py (the front).
"""
