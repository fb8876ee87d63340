"""The text tables the commands print: a plan summary (`superweights plan`) and test metrics (`train`)."""

from __future__ import annotations


def format_plan(s: dict) -> str:
    lines = [f"dataset {s['dataset']} {tuple(s['input_shape'])}, {s['num_classes']} classes; method {s['method']}", ""]
    lines.append(f"{'member':<16}{'params':>14}{'MFLOPs/image':>16}")
    for m in s["members"]:
        lines.append(f"{m['name']:<16}{m['params']:>14,}{m['flops'] / 1e6:>16.2f}")
    full = s["full_ensemble_params"]
    lines += [
        "",
        f"{'budget (bank parameters)':<34}{s['budget']:>14,}",
        f"{'bank_params':<34}{s['bank_params']:>14,}",
        f"{'coefficient_params':<34}{s['coefficient_params']:>14,}",
        f"{'private_params (norms, biases)':<34}{s['private_params']:>14,}",
        f"{'total_params':<34}{s['total_params']:>14,}  ({100 * s['total_params'] / full:.1f}% of full)",
        f"{'full_ensemble_params':<34}{full:>14,}",
    ]
    if "bank_channels_last" in s:  # (`plan --from`: what the saved weights say)
        lines.append("bank weights: " + ("channels_last (cells read as [O, kh, kw, I])" if s["bank_channels_last"]
                                         else "row-major"))
    if "coefficient_sets" in s:
        lines.append(f"grouping {s['grouping']}: {len(s['groups'])} groups; {s['coefficient_sets']} coefficient sets, "
                     f"{s['shared_slot_pairs']} slot pairs sharing coefficients")
    if s["groups"] and "blocks" not in s["groups"][0]:  # SSN: each group is one flat vector
        lines += ["", f"SSN upsample {s['upsample']}", f"{'group':>5}{'slots':>7}{'params':>12}"]
        lines += [f"{g['id']:>5}{len(g['slots']):>7}{g['params']:>12,}" for g in s["groups"]]
    elif s["groups"]:
        lines += ["", f"{'group':>5}  {'kind':<10}{'slots':>6}{'blocks':>7}{'templates':>10}{'params':>12}"]
        for g in s["groups"]:
            lines.append(
                f"{g['id']:>5}  {g['kind']:<10}{len(g['slots']):>6}{len(g['blocks']):>7}"
                f"{sum(b['templates'] for b in g['blocks']):>10}{sum(b['params'] for b in g['blocks']):>12,}"
            )
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    lines = [f"{'':<18}{'test acc':>10}{'NLL':>9}"]
    for name, m in metrics["members"].items():
        lines.append(f"{name:<18}{m['accuracy']:>10.4f}{m['nll']:>9.4f}")
    e = metrics["ensemble"]
    lines.append(f"{'ensemble (mean)':<18}{e['accuracy']:>10.4f}{e['nll']:>9.4f}   "
                 f"ECE {e['ece']:.4f}  disagreement {e['disagreement']:.4f}")
    return "\n".join(lines)
