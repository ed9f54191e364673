"""Is method A better than method B? LDS(A) - LDS(B) with a paired 95% bootstrap interval.

    python examples/compare_methods.py RUN [A B]    # default: dtrak trak

RUN is a run whose LDS stage is done (e.g. by examples/own_images_lds.py). Both methods are
bootstrapped on the same resampled subsets, so the interval is that of the difference itself:
when it excludes 0 the gap is real at this scale.
"""

import sys

from dtrak import pipeline
from dtrak.stages.lds import compare

run = pipeline.open_run(sys.argv[1], None, progress=False)  # read only
a, b = sys.argv[2:4] if len(sys.argv) >= 4 else ("dtrak", "trak")
for targets in run.target_sets():
    r = compare(run, a, b, targets)  # lambda chosen on held-out targets
    verdict = "A better" if r["ci_low"] > 0 else "B better" if r["ci_high"] < 0 else "not separated"
    print(f"{targets}: LDS({a}) - LDS({b}) = {r['diff']:+.2f} points, 95% CI "
          f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], P(diff <= 0) = {r['p_le_0']:.3f}: "
          f"{verdict}")
