"""Training-step and inference cost of a SuperWeight ensemble vs the `full` baseline (issue: core).

Same members, same batch, timed interleaved in one process:
* training step (forward + backward + SGD step) superweights / full      target <= 1.15
* inference with materialised weights / full                             target <= 1.02
* weight generation (forward, and forward+backward) as a share of the superweights training step
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved, write_section  # noqa: E402
from ensemble.config import load_config  # noqa: E402
from ensemble.data import DatasetInfo  # noqa: E402
from ensemble.model import build_ensemble  # noqa: E402
from ensemble.training import ensemble_loss, make_optimizer  # noqa: E402

CASES = {
    "digits 8x8, default members (wrn-16-4, wrn-16-2, wrn-10-4, wrn-10-2), batch 64": (
        DatasetInfo("digits", 1, (8, 8), 10, (0.3,), (0.37,)), [], 64),
    "cifar 32x32, wrn-16-2 + wrn-10-1, batch 32": (
        DatasetInfo("cifar10", 3, (32, 32), 10, (0.5,) * 3, (0.25,) * 3),
        ['ensemble.members=["wrn-16-2","wrn-10-1"]'], 32),
}


def measure(info, overrides, batch, repeats, device):
    torch.manual_seed(0)
    x = torch.rand(batch, info.in_channels, *info.image_size, device=device)
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    models = {m: build_ensemble(load_config(None, [*overrides, f'bank.method="{m}"']), info).to(device)
              for m in ("superweights", "full")}
    opts = {m: make_optimizer(model, load_config(None, overrides), 1000)[0] for m, model in models.items()}

    def step(m):
        def run():
            model = models[m]
            model.train()
            loss = ensemble_loss(model(x), y)
            opts[m].zero_grad(set_to_none=True)
            loss.backward()
            opts[m].step()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    sw = models["superweights"]
    grads = [torch.randn_like(w) for w in sw.bank()]

    def gen_forward():
        with torch.no_grad():
            sw.bank()

    def gen_forward_backward():
        sw.zero_grad(set_to_none=True)
        torch.autograd.backward(sw.bank(), grads)

    train = interleaved({"superweights": step("superweights"), "full": step("full"),
                         "gen": gen_forward, "gen_fb": gen_forward_backward}, repeats)
    plain, full = sw.eval().materialize().eval(), models["full"].eval()

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    infer_t = interleaved({"materialised": infer(plain), "full": infer(full)}, repeats * 3)
    return {
        "step_sw_ms": 1e3 * train["superweights"], "step_full_ms": 1e3 * train["full"],
        "step_ratio": train["superweights"] / train["full"],
        "infer_ratio": infer_t["materialised"] / infer_t["full"],
        "infer_full_ms": 1e3 * infer_t["full"],
        "gen_share": train["gen"] / train["superweights"], "gen_fb_share": train["gen_fb"] / train["superweights"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for name, (info, overrides, batch) in CASES.items():
        r = measure(info, overrides, batch, args.repeats, args.device)
        rows.append(f"| {name} | {r['step_sw_ms']:.1f} / {r['step_full_ms']:.1f} | **{r['step_ratio']:.3f}** "
                    f"| **{r['infer_ratio']:.3f}** ({r['infer_full_ms']:.2f} ms full) "
                    f"| {100 * r['gen_share']:.1f}% / {100 * r['gen_fb_share']:.1f}% |")
        print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    body = f"""## Core: SuperWeight ensemble vs full baseline ({args.device})

Command: `python bench/bench_core.py --repeats {args.repeats} --device {args.device}` (medians, interleaved; {device}, torch {torch.__version__}).
Targets: training step ratio <= 1.15, materialised inference ratio <= 1.02.

| case | train step ms (superweights / full) | step ratio | inference ratio (materialised / full) | generation share of step (forward / forward+backward) |
|---|---|---|---|---|
""" + "\n".join(rows)
    if not args.no_write:
        write_section(f"core-{args.device}", body)
    print(body)


if __name__ == "__main__":
    main()
