"""Peak memory of the joint loss's ranking beside the two losses it ranks (docs/benchmarks/memory.md).

    python benchmarks/cost/joint_memory.py 10000000
"""
import resource
import sys

import torch

from irank.core.joint import joint_loss

n = int(sys.argv[1])
probe, head = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
joint = joint_loss(probe, head)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{n:,} rows: peak RSS rose {(peak - base) / 1024:.0f} MiB over the two losses ({2 * 8 * n / 2**20:.0f} MiB), {(peak - base) * 1024 / n:.0f} bytes a row")
