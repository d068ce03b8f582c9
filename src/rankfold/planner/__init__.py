"""Hardware-aware planning: one (method, rank) choice per layer under a target's budgets."""

from rankfold.planner.plan import LayerPlan, Plan, load_plan, make_plan

__all__ = ["LayerPlan", "Plan", "load_plan", "make_plan"]
