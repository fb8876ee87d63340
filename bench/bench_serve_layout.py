"""Conv-weight layout of the server (`serve.memory_format`): one whole-schedule `predict` per batch size with the
conv weights contiguous, channels_last, and as `auto` runs it (`ServingPredictor`: both measured at start-up per
batch-size bucket, the faster kept). Materialised weights, 1 torch thread (as `superweights serve`), calls
interleaved in an order rotated every round (a run right after another layout's finds colder caches). `auto / contiguous` is what the server gains over holding its weights row-major, as it did
before `auto`; `auto / best` (>= 1) is what a wrong pick at start-up costs.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anytime.record import anytime_record  # noqa: E402
from anytime.serving_predictor import LAYOUTS, ServingPredictor  # noqa: E402
from bench.common import CIFAR, DIGITS, cpu_name, interleaved, write_section  # noqa: E402
from ensemble.config import load_config  # noqa: E402
from ensemble.methods import build_ensemble  # noqa: E402

CASES = {
    "digits 8x8, wrn-16-4 + wrn-16-2 + wrn-10-4 + wrn-10-2 (make run)": (DIGITS, '["wrn-16-4","wrn-16-2","wrn-10-4","wrn-10-2"]'),
    "cifar 32x32, wrn-16-2 + wrn-16-1 + wrn-10-2 + wrn-10-1": (CIFAR, '["wrn-16-2","wrn-16-1","wrn-10-2","wrn-10-1"]'),
    "cifar 32x32, resnet-18-16 + mobilenetv2-50": (CIFAR, '["resnet-18-16","mobilenetv2-50"]'),
}
BATCHES = (1, 4, 16, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=21, help="timed calls per layout and batch size")
    ap.add_argument("--write", action="store_true", help="update the serve-layout section of BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [f"torch {torch.__version__}, {cpu_name()} ({platform.machine()}), 1 torch thread (as `serve`), CPU, "
             f"whole schedule (exits all), median of {args.repeats} calls each, interleaved in an order rotated every round",
             "", "| model | batch | contiguous ms | channels_last ms | auto picks | auto ms | auto / contiguous | "
                 "auto / best |", "|---|---|---|---|---|---|---|---|"]
    for case, (info, members) in CASES.items():
        config = load_config(None, [f"ensemble.members={members}", "ensemble.exits=all", "anytime.schedule=member"])
        model = build_ensemble(config, info).eval()
        record = anytime_record(model, config, info)
        fixed = {name: ServingPredictor(model, record, memory_format=name) for name in LAYOUTS}
        auto = ServingPredictor(model, record)
        for b in BATCHES:
            x = torch.rand(b, info.in_channels, *info.image_size, generator=torch.Generator().manual_seed(b))
            auto.calibrate(x)  # what the server does at start-up for this bucket
            runs = {**fixed, "auto": auto}
            t = interleaved({n: (lambda p=p, x=x: p.predict(x)) for n, p in runs.items()}, args.repeats, rotate=True)
            ms = {k: v * 1e3 for k, v in t.items()}
            best = min(ms["contiguous"], ms["channels_last"])
            line = (f"| {case} | {b} | {ms['contiguous']:.2f} | {ms['channels_last']:.2f} | {auto.format_for(b)} | "
                    f"{ms['auto']:.2f} | {ms['auto'] / ms['contiguous']:.3f} | {ms['auto'] / best:.3f} |")
            lines.append(line)
            print(line, flush=True)
    if args.write:
        write_section("serve-layout", "\n".join(lines))


if __name__ == "__main__":
    main()
