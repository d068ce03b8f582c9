"""Hardware-aware planning: one (method, rank) choice per layer under a target's budgets."""

from rankfold.planner.plan import LayerPlan, Plan, apply_plan, load_plan, make_plan, price_model

__all__ = ["LayerPlan", "Plan", "apply_plan", "load_plan", "make_plan", "price_model"]
