"""Anytime predictor overhead (issue 3): time of `AnytimePredictor.predict` for a schedule prefix over the
direct forward of the same members up to the same exits (stem -> stages -> that exit, mean softmax).
The predictor also evaluates the intermediate exits it passes (they are steps of the schedule) and
checks budgets; target ratio <= 1.05. Materialised weights on both sides, interleaved timing.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anytime.predictor import AnytimePredictor  # noqa: E402
from anytime.record import anytime_record  # noqa: E402
from bench.common import CIFAR, DIGITS, interleaved, write_section  # noqa: E402
from ensemble.config import load_config  # noqa: E402
from ensemble.methods import build_ensemble  # noqa: E402

CASES = {
    "digits 8x8, wrn-16-4 + wrn-16-2 + wrn-10-4 + wrn-10-2, exits all, batch 256": (
        DIGITS,
        '["wrn-16-4","wrn-16-2","wrn-10-4","wrn-10-2"]', 256),
    "cifar 32x32, wrn-16-2 + wrn-10-1, exits all, batch 64": (
        CIFAR, '["wrn-16-2","wrn-10-1"]', 64),
}


def direct(plain, steps):
    """Forward of the started members straight to their latest exit in the prefix (no other exits)."""
    latest: dict[int, int] = {}
    for m, k in steps:
        latest[m] = k

    @torch.no_grad()
    def run(x):
        h0 = plain.normalize(x)
        probs = []
        for m, k in latest.items():
            em = plain.members[m]
            h = em.member.stem(h0)
            for s in range(em.exit_stages[k] + 1):
                h = em.member.stages[s](h)
            probs.append(em.exit_module(k)(h).softmax(-1))
        return torch.stack(probs).mean(0)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--write", action="store_true", help="update the anytime section of BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, CPU",
             "", "| case | prefix | predictor ms | direct ms | ratio |", "|---|---|---|---|---|"]
    for case, (info, members, batch) in CASES.items():
        config = load_config(None, [f"ensemble.members={members}", "ensemble.exits=all", "anytime.schedule=member"])
        model = build_ensemble(config, info).eval()
        record = anytime_record(model, config, info)
        pred = AnytimePredictor(model, record)
        x = torch.rand(batch, info.in_channels, *info.image_size)
        n = len(pred.steps)
        for prefix in (n // 2, n):
            steps = pred.steps[:prefix]
            budget = pred.cumulative_flops[prefix - 1]
            ref = direct(pred.model, steps)
            assert torch.allclose(pred.predict(x, budget_flops=budget).probs, ref(x), atol=1e-5)
            t = interleaved({"predictor": lambda b=budget, p=pred, x=x: p.predict(x, budget_flops=b),
                             "direct": lambda r=ref, x=x: r(x)}, args.repeats)
            ratio = t["predictor"] / t["direct"]
            line = f"| {case} | {prefix}/{n} steps | {t['predictor'] * 1e3:.2f} | {t['direct'] * 1e3:.2f} | {ratio:.3f} |"
            lines.append(line)
            print(f"{case}: prefix {prefix}/{n}: predictor {t['predictor'] * 1e3:.2f} ms, direct {t['direct'] * 1e3:.2f} ms, "
                  f"ratio {ratio:.3f} (target <= 1.05)")
    if args.write:
        write_section("anytime", "\n".join(lines))


if __name__ == "__main__":
    main()
