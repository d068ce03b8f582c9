"""What several test files share: the CLI run as a user runs it, and a tiny trained-shape classifier."""

import subprocess
import sys

import torch
from torch import nn


def run_cli(*args, cwd=None):
    """`rankfold ARGS` in a subprocess: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "rankfold.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def tiny_classifier() -> nn.Module:
    """Two convolutions and a classifier for (N, 1, 12, 12) inputs, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
