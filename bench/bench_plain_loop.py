"""Issue 17 item 4: a plain PyTorch loop of the protocol's members, the reference our `full` ensemble must match.

Same data tensors as `superweights train` (loaded through `ensemble.data.load_data` with the protocol config, so
slice, validation split, image size and channel statistics are identical), same members (built with the
project's registry: `ensemble/members/wrn.py`), same epochs, batch size, lr, momentum and weight decay. Nothing
else of the project is used: the loop, the optimiser (SGD + Nesterov momentum, weight decay on every parameter,
per-step cosine to 0), the augmentation (random crop with zero padding of 1/8 of the side + horizontal flip, on
uint8 tensors), the init (WRN reference: Kaiming normal fan_out for convs, PyTorch default for the classifier)
and the evaluation (mean of the members' softmax) are written out here.

By default each member trains on its own (its own shuffle and augmentation stream, as separately trained
networks would); `--joint` feeds every member the same batches (as our jointly trained ensemble does), which
separates "joint batches cost diversity" from "our loop is weaker". Prints each member's and the ensemble's
test accuracy and NLL and the seconds per epoch (all members).

    python bench/bench_plain_loop.py --config configs/cifar10-cpu.toml [--set train.epochs=30] [--seed 0] [--joint]

`--vs-ours` first runs our `full` ensemble through the product (`superweights train --workers 0`, same config,
seed and threads), then this loop on the same batches (`--joint`), and reports both ensembles' test accuracy and
the median epoch seconds side by side (issue 16 item 3: ours / plain <= 1.05); `--write` puts the table in
BENCHMARKS.md (section "plain-loop"). Like ours, the plain loop validates every epoch (the members' mean softmax
on the same validation split, at the same `train.eval_batch_size`, in eval mode without gradients), so the
epoch ratio compares like with like; the training steps alone are timed on both sides too. Members and batches
are row-major unless `--channels-last`; with `--vs-ours` the plain loop takes ours' layout (`train.channels_last`,
on unless set false), for the same reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def crop_flip(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random crop of the zero-padded uint8 batch (same size) + horizontal flip with p=0.5, per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
    flip = (torch.rand(b, generator=g) < 0.5).tolist()
    for i in range(b):
        img = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = img.flip(-1) if flip[i] else img
    return out


def batches(x: torch.Tensor, y: torch.Tensor, bs: int, g: torch.Generator, augment: bool, pad: int):
    order = torch.randperm(len(y), generator=g)
    for lo in range(0, len(y), bs):
        idx = order[lo:lo + bs]
        xb = x[idx]
        if augment:
            xb = crop_flip(xb, pad, g)
        yield xb, y[idx]


def init_reference(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def init_ours(model: nn.Module) -> None:  # the product's `full` baseline init
    from ensemble.methods import reference_init_

    reference_init_(model)


@torch.no_grad()
def init_he_fan_in(model: nn.Module) -> None:
    """The `full` baseline's init before 2026-12-03: He (fan_in) normal on every conv and linear layer."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight[0].numel()))
            if m.bias is not None:
                m.bias.zero_()


def init_he_fan_in_convs(model: nn.Module) -> None:  # the old convs, PyTorch's default classifier
    init_he_fan_in(model)
    for m in _linears(model):
        m.reset_parameters()


def init_reference_convs(model: nn.Module) -> None:  # the reference convs, the old He classifier
    init_reference(model)
    for m in _linears(model):
        init_he_fan_in(m)


INITS = {"reference": init_reference, "ours": init_ours, "he-fan-in": init_he_fan_in,
         "he-fan-in-convs": init_he_fan_in_convs, "reference-convs": init_reference_convs}


@torch.no_grad()
def test_probs(model: nn.Module, x: torch.Tensor, norm, bs: int) -> torch.Tensor:
    model.eval()
    out = [F.softmax(model(norm(x[i:i + bs])), dim=1) for i in range(0, len(x), bs)]
    model.train()
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", default="configs/cifar10-cpu.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--seed", type=int, default=None, help="default: train.seed")
    p.add_argument("--joint", action="store_true", help="every member on the same batches (like our loop)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--init", choices=tuple(INITS), default="reference",
                   help="reference: WRN's Kaiming fan_out convs + PyTorch's default classifier; ours: the `full` "
                        "baseline's init (ensemble.methods.reference_init_, the same stds); he-fan-in: our init "
                        "before 2026-12-03 (He fan_in normal everywhere); he-fan-in-convs / reference-convs: one "
                        "of those two on the convs, the other's classifier, to tell which layer an effect comes from")
    p.add_argument("--channels-last", action="store_true",
                   help="members and batches in channels_last memory (with --vs-ours: as ours, i.e. unless "
                        "--set train.channels_last=false)")
    p.add_argument("--vs-ours", action="store_true", help="also train our full ensemble first; compare side by side")
    p.add_argument("--write", action="store_true", help="with --vs-ours: write the BENCHMARKS.md section")
    args = p.parse_args()
    ours = _run_ours(args) if args.vs_ours else None
    if ours is not None:
        args.joint = True  # the same batches for every member, as our loop feeds them

    from ensemble import members as _members  # noqa: F401 (registers the member families)
    from ensemble.config import load_config
    from ensemble.data import load_data
    from ensemble.datasets.loader import crop_padding
    from ensemble.registry import create_model

    cfg = load_config(args.config, args.set)
    t = cfg.train
    if ours is not None:  # the same memory layout as ours (train.channels_last: unset = on)
        args.channels_last = cfg.train.channels_last is not False
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    seed = t.seed if args.seed is None else args.seed
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_data(cfg.data, seed, t.batch_size, t.eval_batch_size)  # same slice/split as superweights train
    info = splits.info
    # the raw uint8 tensors behind the project's loaders (pixel scale 255 for every image dataset used here)
    x_tr, y_tr = splits.train._x, splits.train._y
    x_te, y_te = splits.test._x, splits.test._y
    x_va, y_va = splits.val._x, splits.val._y
    eval_bs = splits.val.batch_size  # train.eval_batch_size as our loop resolves it (0 = automatic)
    scale = splits.train._scale
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)

    def norm(xb: torch.Tensor) -> torch.Tensor:
        return ((xb.float() / scale - mean) / std).contiguous(memory_format=layout)

    augment = cfg.data.augment
    pad = crop_padding(*x_tr.shape[-2:])
    names = list(cfg.ensemble.members)
    print(f"plain loop: {len(names)} members ({', '.join(names)}) on {cfg.data.name} {tuple(x_tr.shape[-2:])}: "
          f"{len(y_tr)} train / {len(y_te)} test images, {t.epochs} epochs, bs {t.batch_size}, lr {t.lr}, "
          f"wd {t.weight_decay}, augment {augment} (pad {pad}), seed {seed}, "
          f"{'joint batches' if args.joint else 'independent members'}, {args.init} init, "
          f"{'channels_last' if args.channels_last else 'row-major'}, "
          f"{torch.get_num_threads()} threads")

    torch.manual_seed(seed)
    models = [create_model(n, info.in_channels, info.num_classes) for n in names]
    for m in models:
        INITS[args.init](m)
        m.to(memory_format=layout)
    steps = t.epochs * math.ceil(len(y_tr) / t.batch_size)
    opts, scheds = [], []
    for m in models:
        o = torch.optim.SGD(m.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0,
                            weight_decay=t.weight_decay)
        opts.append(o)
        scheds.append(torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gens = [torch.Generator().manual_seed(seed * 1000 + (0 if args.joint else i + 1)) for i in range(len(models))]

    def step(i: int, xb, yb) -> float:
        loss = F.cross_entropy(models[i](norm(xb)), yb)
        opts[i].zero_grad(set_to_none=True)
        loss.backward()
        opts[i].step()
        scheds[i].step()
        return loss.item()

    epoch_s, train_s = [], []
    val_acc = float("nan")
    for epoch in range(t.epochs):
        t0 = time.perf_counter()
        if args.joint:
            for xb, yb in batches(x_tr, y_tr, t.batch_size, gens[0], augment, pad):
                for i in range(len(models)):
                    step(i, xb, yb)
        else:
            for i in range(len(models)):
                for xb, yb in batches(x_tr, y_tr, t.batch_size, gens[i], augment, pad):
                    step(i, xb, yb)
        train_s.append(time.perf_counter() - t0)
        if len(y_va):  # the per-epoch validation pass a training loop runs (ours does)
            val_mean = torch.stack([test_probs(m, x_va, norm, eval_bs) for m in models]).mean(0)
            val_acc = (val_mean.argmax(1) == y_va).float().mean().item()
        epoch_s.append(time.perf_counter() - t0)
        if (epoch + 1) % 5 == 0 or epoch + 1 == t.epochs:
            print(f"epoch {epoch + 1:3d}/{t.epochs}  ({epoch_s[-1]:.1f}s, val acc {val_acc:.4f})", flush=True)

    probs = [test_probs(m, x_te, norm, eval_bs) for m in models]
    print(f"\n{'':20s}{'test acc':>10s}{'NLL':>9s}")
    accs = []
    for n, pr in zip(names, probs):
        acc = (pr.argmax(1) == y_te).float().mean().item()
        accs.append(acc)
        print(f"{n:20s}{acc:10.4f}{F.nll_loss(pr.clamp_min(1e-12).log(), y_te).item():9.4f}")
    ens = torch.stack(probs).mean(0)
    ens_acc = (ens.argmax(1) == y_te).float().mean().item()
    print(f"{'ensemble (mean)':20s}{ens_acc:10.4f}{F.nll_loss(ens.clamp_min(1e-12).log(), y_te).item():9.4f}")
    print(f"gap over best member: {100 * (ens_acc - max(accs)):+.2f} points; mean member {sum(accs) / len(accs):.4f}")
    print(f"seconds/epoch (all members): median {statistics.median(epoch_s):.1f} (training steps "
          f"{statistics.median(train_s):.1f}), total {sum(epoch_s):.0f}s")
    if ours is not None:
        _report(args, cfg, ours, ens_acc, statistics.median(epoch_s), statistics.median(train_s), len(y_va), eval_bs)
    return 0


def _run_ours(args) -> dict:
    """Our `full` ensemble through `superweights train --workers 0` (a subprocess, as a user runs it)."""
    cmd = [sys.executable, "-m", "ray_jobs.cli", "train", "--config", args.config, "--workers", "0", "--no-tracking",
           "--quiet", "--set", 'bank.method="full"', "--set", 'bank.grouping="depth"', "--set", "bank.unshare_epoch=0"]
    # (gradient grouping and unsharing are SuperWeight steps: a full-ensemble config refuses them)
    for s in args.set:
        cmd += ["--set", s]
    if args.seed is not None:
        cmd += ["--set", f"train.seed={args.seed}"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="sw-plain-") as tmp:
        cmd += ["--storage-path", f"{tmp}/runs", "--out", f"{tmp}/out"]
        print("ours:", " ".join(cmd), flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        if p.returncode:
            sys.exit(f"bench_plain_loop: our training failed: {p.stderr.strip().splitlines()[-1:]}")
        from ensemble.train_state import latest_complete

        (run_dir,) = [d for d in Path(tmp, "runs").iterdir() if d.is_dir()]
        history = json.loads((latest_complete(run_dir) / "train_state.json").read_text())["history"]
    acc = re.search(r"^ensemble \(mean\)\s+([0-9.]+)", p.stdout, flags=re.M)
    print(p.stdout[p.stdout.find("test acc") - 30:p.stdout.find("model files")].rstrip(), flush=True)
    return {"epoch_s": statistics.median(r["seconds"] for r in history),
            "train_s": statistics.median(r["train_seconds"] for r in history),
            "accuracy": float(acc.group(1)), "epochs": len(history)}


def _report(args, cfg, ours: dict, plain_acc: float, plain_s: float, plain_train_s: float,
            len_val: int, eval_bs: int) -> None:
    ratio, train_ratio = ours["epoch_s"] / plain_s, ours["train_s"] / plain_train_s
    cmd = "python bench/bench_plain_loop.py " + " ".join(
        [f"--config {args.config}"] + [f"--set '{s}'" for s in args.set] + [f"--threads {args.threads}"] * bool(args.threads)
        + ["--vs-ours", "--write"])
    body = f"""## Our full ensemble vs a plain PyTorch loop (bench/bench_plain_loop.py)

Command: `{cmd}`. Same members ({', '.join(cfg.ensemble.members)}), data tensors, batches, epochs
({cfg.train.epochs}), optimiser settings and threads ({args.threads or 'default'}), one run, ours first. An
epoch is the training steps plus one validation pass over {cfg.data.name}'s validation split
({len_val:,} images, batch {eval_bs}) on both sides; the training steps alone are ours'
`train_seconds` (MLflow metric and train_state.json history) and the plain loop's steps timed the same way.
Target (issue 16): ours / plain <= 1.05.

| loop | ensemble test accuracy | median s/epoch | median s/epoch, training steps only |
|---|---|---|---|
| `superweights train --workers 0`, `bank.method="full"` | {ours['accuracy']:.4f} | {ours['epoch_s']:.2f} | {ours['train_s']:.2f} |
| plain PyTorch loop, same batches (`--joint`), {'channels_last' if args.channels_last else 'row-major'} as ours | {plain_acc:.4f} | {plain_s:.2f} | {plain_train_s:.2f} |
| **ratio ours / plain** | | **{ratio:.3f}** | **{train_ratio:.3f}** |
"""
    print(body)
    if args.write:
        from bench.common import write_section

        write_section("plain-loop", body)


if __name__ == "__main__":
    sys.exit(main())
