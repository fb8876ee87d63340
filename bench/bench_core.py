"""Training-step and inference cost of a SuperWeight ensemble vs the `full` baseline (issue: core).

Same members, same batch, timed interleaved in one process:
* training step (forward + backward + SGD step) superweights / full      targets (issue 16): digits <= 1.10,
                                                                          32x32 inputs <= 1.03
* inference with materialised weights / full                             target <= 1.02
* weight generation (forward, and forward+backward) as a share of the superweights training step
* weight generation forward+backward, ms and aten calls (torch.profiler, nested calls counted; "kernels" leaves
  out metadata-only views): the per-block/per-slot reference (`core.reference`, before issue 16) vs the batched
  generation (`core.generation`), on the same bank
* peak memory of one training step, superweights / full: parameters, buffers (incl. generation index tensors),
  optimizer state, plus the step's peak of allocations (torch.profiler memory events on CPU,
  torch.cuda.max_memory_allocated on CUDA)

The training step is the product's (`ensemble.training.Accelerator.step`, what `superweights train` runs), so
`--precision bf16`, `--channels-last` and `--compile` time the GPU configuration users get (`train.precision`,
`train.channels_last`, `train.compile`); on CUDA every timed call ends with a synchronize. `bench/device_check.sh`
runs the CUDA table in one call when a GPU is lent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CIFAR, DIGITS, cpu_name, interleaved, write_section  # noqa: E402
from core.reference import ReferenceGenerator  # noqa: E402
from ensemble.config import load_config  # noqa: E402
from ensemble.methods import build_ensemble  # noqa: E402
from ensemble.training import Accelerator, make_optimizer  # noqa: E402

CASES = {
    "digits 8x8, default members (wrn-16-4, wrn-16-2, wrn-10-4, wrn-10-2), batch 64": (
        DIGITS, [], 64),
    "cifar 32x32, wrn-16-2 + wrn-10-1, batch 32": (
        CIFAR,
        ['ensemble.members=["wrn-16-2","wrn-10-1"]'], 32),
}


METADATA = {
    "aten::view", "aten::as_strided", "aten::slice", "aten::narrow", "aten::select", "aten::transpose",
    "aten::unsqueeze", "aten::expand", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::reshape",
    "aten::_reshape_alias", "aten::alias", "aten::detach", "aten::resolve_conj", "aten::resolve_neg", "aten::t",
    "aten::permute", "aten::squeeze", "aten::flatten", "aten::lift_fresh", "aten::detach_",
}


def aten_calls(fn) -> tuple[int, int]:
    """(all aten calls, those that are not metadata-only views) of one call of fn, nested calls counted (but not
    the per-tensor loop of a `_foreach_*` op on CPU: on a GPU that is one multi-tensor kernel)."""
    from torch.profiler import ProfilerActivity, profile

    def in_foreach(e):
        while (e := e.cpu_parent) is not None:
            if e.name.startswith("aten::_foreach_"):
                return True
        return False

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events() if e.name.startswith("aten::") and not in_foreach(e)]
    return len(names), sum(n not in METADATA for n in names)


def persistent_bytes(model, opt) -> int:
    tensors = {t.data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    for state in opt.state.values():
        tensors.update({t.data_ptr(): t.untyped_storage().nbytes() for t in state.values() if torch.is_tensor(t)})
    bank = getattr(model, "bank", None)
    for program in getattr(bank, "_programs", {}).values():  # generation index tensors (built once per plan)
        if program is None:
            continue
        index = program.index_tensors() if hasattr(program, "index_tensors") else program.matmuls.index_tensors()
        tensors.update({t.data_ptr(): t.untyped_storage().nbytes() for t in index})
    return sum(tensors.values())


def step_peak_bytes(fn, device) -> int:
    """Peak of memory allocated during fn() above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.cpu_memory_usage
        peak = max(peak, level)
    return peak


def synced(fn, device):
    """fn, then (on CUDA) a synchronize, so a timer measures the kernels and not their launch."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()
    return run


def measure(info, overrides, batch, repeats, device, train_overrides=()):
    """`train_overrides`: `train.*` overrides (precision, channels_last, compile) for both methods' training steps."""
    torch.manual_seed(0)
    if any(o == "train.compile=true" for o in train_overrides):
        torch._dynamo.reset()  # each case's members compile afresh (dynamo's graph limit counts per process)
    x = torch.rand(batch, info.in_channels, *info.image_size, device=device)
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    configs = {m: load_config(None, [*overrides, *train_overrides, f'bank.method="{m}"']) for m in ("superweights", "full")}
    accels = {m: Accelerator(c, torch.device(device)) for m, c in configs.items()}
    models = {m: build_ensemble(c, info, channels_last=accels[m].channels_last).to(device) for m, c in configs.items()}
    optims = {m: make_optimizer(models[m], c, 10**6) for m, c in configs.items()}
    for m, accel in accels.items():
        accel.prepare(models[m])  # channels_last members if configured
    inputs = {m: accel.inputs(x) for m, accel in accels.items()}

    def step(m):
        def run():
            models[m].train()
            accels[m].step(models[m], inputs[m], y, *optims[m])
        return synced(run, device)

    sw = models["superweights"]
    grads = [torch.randn_like(w) for w in sw.bank()]

    def gen_forward():
        with torch.no_grad():
            sw.bank()

    def gen_forward_backward():
        sw.zero_grad(set_to_none=True)
        torch.autograd.backward(sw.bank(), grads)

    ref = ReferenceGenerator(sw.bank)

    def ref_forward_backward():
        sw.zero_grad(set_to_none=True)
        torch.autograd.backward(ref(), grads)

    gen_forward, gen_forward_backward, ref_forward_backward = (
        synced(f, device) for f in (gen_forward, gen_forward_backward, ref_forward_backward))

    train = interleaved({"superweights": step("superweights"), "full": step("full"),
                         "gen": gen_forward, "gen_fb": gen_forward_backward, "ref_fb": ref_forward_backward}, repeats)
    calls_new, calls_ref = aten_calls(gen_forward_backward), aten_calls(ref_forward_backward)
    peak = {m: persistent_bytes(models[m], optims[m][0]) + step_peak_bytes(step(m), device) for m in models}
    plain, full = sw.eval().materialize().eval(), models["full"].eval()

    def infer(model):
        def run():
            with torch.no_grad():
                model(inputs["full"])
        return synced(run, device)

    infer_t = interleaved({"materialised": infer(plain), "full": infer(full)}, repeats * 3)
    return {
        "step_sw_ms": 1e3 * train["superweights"], "step_full_ms": 1e3 * train["full"],
        "step_ratio": train["superweights"] / train["full"],
        "infer_ratio": infer_t["materialised"] / infer_t["full"],
        "infer_full_ms": 1e3 * infer_t["full"],
        "gen_share": train["gen"] / train["superweights"], "gen_fb_share": train["gen_fb"] / train["superweights"],
        "gen_fb_ms": 1e3 * train["gen_fb"], "ref_fb_ms": 1e3 * train["ref_fb"], "calls_new": calls_new,
        "calls_ref": calls_ref, "slots": len(sw.plan.slots), "blocks": len(sw.plan.blocks),
        "peak_sw_mb": peak["superweights"] / 2**20, "peak_full_mb": peak["full"] / 2**20,
        "peak_ratio": peak["superweights"] / peak["full"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="train.precision of both methods' training steps (bf16: autocast, generation in fp32)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="train.channels_last (auto: the product's default, on)")
    p.add_argument("--compile", action="store_true", help="train.compile = true (torch.compile of the members)")
    p.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    train = [f'train.precision="{args.precision}"', f"train.compile={str(args.compile).lower()}"]
    if args.channels_last != "auto":
        train.append(f"train.channels_last={str(args.channels_last == 'on').lower()}")
    flags = "".join([f" --precision {args.precision}" if args.precision != "fp32" else "",
                     f" --channels-last {args.channels_last}" if args.channels_last != "auto" else "",
                     " --compile" if args.compile else ""])
    rows, gen_rows = [], []
    for name, (info, overrides, batch) in CASES.items():
        r = measure(info, overrides, batch, args.repeats, args.device, train)
        rows.append(f"| {name} | {r['step_sw_ms']:.1f} / {r['step_full_ms']:.1f} | **{r['step_ratio']:.3f}** "
                    f"| **{r['infer_ratio']:.3f}** ({r['infer_full_ms']:.2f} ms full) "
                    f"| {100 * r['gen_share']:.1f}% / {100 * r['gen_fb_share']:.1f}% "
                    f"| {r['peak_sw_mb']:.0f} / {r['peak_full_mb']:.0f} MiB: **{r['peak_ratio']:.2f}** |")
        gen_rows.append(f"| {name} ({r['slots']} slots, {r['blocks']} blocks) "
                        f"| {r['ref_fb_ms']:.2f} / {r['gen_fb_ms']:.2f} "
                        f"| {r['calls_ref'][0]:,} ({r['calls_ref'][1]:,}) / {r['calls_new'][0]:,} ({r['calls_new'][1]:,}) |")
        print(rows[-1], gen_rows[-1], sep="\n", flush=True)
    device = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
              else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)")
    body = f"""## Core: SuperWeight ensemble vs full baseline ({args.device}{flags})

Command: `python bench/bench_core.py --repeats {args.repeats} --device {args.device}{flags}` (medians, interleaved; {device}, torch {torch.__version__}).
Targets: training step ratio <= 1.10 on digits and <= 1.03 on 32x32 inputs (issue 16), materialised inference
ratio <= 1.02. Peak memory: parameters + buffers + optimizer state + the peak of one training step's allocations.

| case | train step ms (superweights / full) | step ratio | inference ratio (materialised / full) | generation share of step (forward / forward+backward) | peak training memory (superweights / full) |
|---|---|---|---|---|---|
""" + "\n".join(rows) + """

Weight generation forward+backward on the same bank: before (per-block, per-slot `core.reference`) / after
(batched `core.generation`). aten calls from torch.profiler, nested calls counted; in brackets the calls that are
not metadata-only views (those launch kernels on a GPU).

| case | generation fwd+bwd ms (before / after) | aten calls, all (kernels) (before / after) |
|---|---|---|
""" + "\n".join(gen_rows)
    if not args.no_write:
        write_section(f"core-{args.device}" + flags.replace(" --", "-").replace(" ", "-"), body)
    print(body)


if __name__ == "__main__":
    main()
