"""Batched generation (`core.generation`, issue 16) against the per-block, per-slot one it replaced
(`core.reference`): same seed -> same weights and gradients, on real architectures' plans at low, mid and high
budgets, SuperWeights and SSN; and a number of kernels per generation that does not grow with the slots."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from core.bank import SuperWeightBank
from core.plan import SlotSpec, build_plan
from core.reference import ReferenceGenerator
from core.slots import trace_slots
from core.ssn import UPSAMPLERS, SSNBank, build_ssn_plan, ssn_groups

# Architectures come from ensemble's registry (tests may import any layer; core itself never does).
FAMILIES = {
    "wrn": ["wrn-10-2", "wrn-10-1"],
    "resnet": ["resnet-18-8", "resnet-18-4"],
    "mobilenetv2": ["mobilenetv2-35", "mobilenetv2-25"],
    "mlp": ["mlp-128-2", "mlp-64-3"],
}
DIGITS = ["wrn-16-4", "wrn-16-2", "wrn-10-4", "wrn-10-2"]  # the default members (ensemble.config)


def traced(names: list[str], channels: int = 3, size: int = 32) -> list[SlotSpec]:
    from ensemble import members as _members  # noqa: F401  (registers the architectures)
    from ensemble.registry import create_model

    out = []
    x = torch.zeros(1, channels, size, size, device="meta")
    for m, name in enumerate(names):
        with torch.device("meta"):
            model = create_model(name, channels, 10)
        out += [SlotSpec(m, n, kind, shape) for n, kind, shape in trace_slots(model, x)]
    return out


_SLOTS: dict[str, list[SlotSpec]] = {}


def family_slots(family: str) -> list[SlotSpec]:
    if family not in _SLOTS:
        _SLOTS[family] = traced(FAMILIES[family])
    return _SLOTS[family]


def banks(family: str, budget: float):
    """The SuperWeight bank and one SSN bank per upsampler of the family's plan (same seed)."""
    slots = family_slots(family)
    yield "superweights", SuperWeightBank(build_plan(slots, budget), torch.Generator().manual_seed(0))
    for upsample in UPSAMPLERS:
        plan = build_ssn_plan(slots, budget, ssn_groups(slots, "depth", 4), 4, upsample)
        bank = SSNBank(plan, torch.Generator().manual_seed(0))
        with torch.no_grad():  # masks and coefficients as training leaves them
            bank.coefficients.add_(0.1 * torch.randn(bank.coefficients.shape, generator=torch.Generator().manual_seed(1)))
        yield f"ssn-{upsample}", bank


def loss_grads(bank, weights, seed=3):
    g = torch.Generator().manual_seed(seed)
    # (noise drawn on the CPU, so every device sees the same loss)
    loss = sum((w * torch.randn(w.shape, generator=g, dtype=w.dtype).to(w.device)).sum() for w in weights if w is not None)
    bank.zero_grad(set_to_none=True)
    loss.backward()
    coef = bank.coefficients.grad
    return bank.bank.grad.clone(), None if coef is None else coef.clone()


@pytest.mark.parametrize("budget", [0.01, 0.5, 2.0])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_generation_equals_the_reference_weights_and_gradients(family, budget):
    for kind, bank in banks(family, budget):
        ref = ReferenceGenerator(bank)
        # float32, as trained: same weights to atol 1e-6 (they are ~He scale, so this is a few ulps)
        new, old = bank(), ref()
        assert len(new) == len(old) == len(bank.plan.slots)
        for i, (a, b) in enumerate(zip(new, old)):
            assert a.shape == b.shape, (kind, i)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{kind} slot {i}")
        ga, gb = loss_grads(bank, new), loss_grads(bank, old)
        # gradients sum ~1e5 terms in another order (chunks): equal to float32 rounding of their magnitude
        for x, y in zip(ga, gb):
            if y is not None:
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5 * max(1.0, y.abs().max().item()), msg=kind)
        # float64: the same computation, so the gradients are equal to atol 1e-6 (measured ~1e-13)
        bank.double()
        ga, gb = loss_grads(bank, bank()), loss_grads(bank, ref())
        for x, y in zip(ga, gb):
            if y is not None:
                torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=kind)


@pytest.mark.parametrize("budget", [0.01, 0.5, 2.0])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_channels_last_banks_generate_channels_last_weights_equal_to_the_reference(family, budget):
    """A bank made for channels_last convolutions reads each cell as [Ob, kh, kw, Ib]: its conv weights are
    channels_last views (no convolution converts them), equal to the reference's reading of the same products
    (weights and gradients), each slot the same numbers as the row-major bank's, in another arrangement within
    its cells (so the same gains: the same init std); linear and 1x1 slots unchanged. A member-parallel subset
    is the full program bit for bit, as in row-major banks."""
    slots = family_slots(family)
    plan = build_plan(slots, budget)
    rows = SuperWeightBank(plan, torch.Generator().manual_seed(0))
    bank = SuperWeightBank(plan, torch.Generator().manual_seed(0), channels_last=True)
    assert torch.equal(bank.gains, rows.gains) and torch.equal(bank.bank, rows.bank)
    new, old, plain = bank(), ReferenceGenerator(bank)(), rows()
    for i, (a, b, c) in enumerate(zip(new, old, plain)):
        shape = plan.slots[i].shape
        permuted = len(shape) == 4 and shape[1] > 1 and shape[2] * shape[3] > 1
        assert a.is_contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.contiguous_format)
        assert a.is_contiguous() == (not permuted), i
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"slot {i}")
        assert torch.equal(a.flatten().sort()[0], c.flatten().sort()[0]), i
        if not permuted:
            assert torch.equal(a, c), i
    assert any(len(s.shape) == 4 and s.shape[1] > 1 and s.shape[2] > 1 for s in plan.slots) == (family != "mlp")
    ga, gb = loss_grads(bank, new), loss_grads(bank, old)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5 * max(1.0, y.abs().max().item()))
    # the order is the weights': a row-major bank loading them (a resume with train.channels_last flipped, or
    # `evaluate` on a CPU) becomes a channels_last one and generates the same tensors
    other = SuperWeightBank(plan, torch.Generator().manual_seed(3))
    other.load_state_dict(bank.state_dict())
    assert int(other.channels_last) == 1
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(other(), new))
    thin = plan.member_slots(1)
    part = bank(slots=thin)
    assert all(torch.equal(part[i], new[i]) for i in thin)
    g_part = loss_grads(bank, part)
    g_full = loss_grads(bank, [w if i in thin else None for i, w in enumerate(bank())])
    assert torch.equal(g_part[0], g_full[0]) and torch.equal(g_part[1], g_full[1])


@pytest.mark.parametrize("upsample", UPSAMPLERS)
def test_channels_last_ssn_banks_view_their_vectors_as_channels_last_weights(upsample):
    """An SSN bank for channels_last convolutions reads a wavg, repeat or mask slot's vector as [O, kh, kw, I]:
    the same memory under channels_last strides (no copy), the reference's reading, each slot the row-major
    bank's numbers rearranged; inter slots (an interpolation over [O, I kh kw]) stay row-major."""
    slots = family_slots("wrn")
    plan = build_ssn_plan(slots, 0.5, ssn_groups(slots, "depth", 4), 4, upsample)
    rows = SSNBank(plan, torch.Generator().manual_seed(0))
    bank = SSNBank(plan, torch.Generator().manual_seed(0), channels_last=True)
    new, old, plain = bank(), ReferenceGenerator(bank)(), rows()
    permuted = 0
    for i, (a, b, c) in enumerate(zip(new, old, plain)):
        shape, mode = plan.slots[i].shape, plan.slot_layout[i].mode
        cl = mode != "inter" and len(shape) == 4 and shape[1] > 1 and shape[2] * shape[3] > 1
        permuted += cl
        assert a.is_contiguous() == (not cl) and (not cl or a.is_contiguous(memory_format=torch.channels_last)), i
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"slot {i}")
        assert torch.equal(a.flatten().sort()[0], c.flatten().sort()[0]) if cl else torch.equal(a, c), i
    assert permuted > 0
    for x, y in zip(loss_grads(bank, new), loss_grads(bank, old)):
        if y is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5 * max(1.0, y.abs().max().item()))
    other = SSNBank(plan, torch.Generator().manual_seed(3))
    other.load_state_dict(bank.state_dict())
    assert int(other.channels_last) == 1 and all(torch.equal(a, b) for a, b in zip(other(), new))


def test_subset_generation_equals_the_reference_subset():
    for kind, bank in banks("mobilenetv2", 0.5):
        ref = ReferenceGenerator(bank)
        thin = bank.plan.member_slots(1)
        new, old = bank(slots=thin), ref(thin)
        for i, (a, b) in enumerate(zip(new, old)):
            assert (a is None) == (b is None) == (i not in thin), (kind, i)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# -- number of aten calls -------------------------------------------------------------------------------------

# Metadata-only aten calls: they make a tensor object, launch no kernel and move no data. A slot weight is one
# tensor object, so one view per slot (forward) and one flattening view per slot gradient (backward) remain.
METADATA = {
    "aten::view", "aten::as_strided", "aten::slice", "aten::narrow", "aten::select", "aten::transpose",
    "aten::unsqueeze", "aten::expand", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::reshape",
    "aten::_reshape_alias", "aten::alias", "aten::detach", "aten::resolve_conj", "aten::resolve_neg", "aten::t",
    "aten::permute", "aten::squeeze", "aten::flatten", "aten::lift_fresh", "aten::detach_",
}
# aten calls that run a kernel in one generation forward + backward, whatever the plan: ~70 fixed (gathers,
# scatters, gains, allocations) + 3 bmm per (K, R) class, and classes are bounded by max_templates x the row
# classes (exact up to 4 coefficient sets per block, then powers of two), never by slots or blocks. Measured:
# 82 (11 slots), 97 (56 slots, digits), 104 (182 slots), +6 since the template gather by runs (103 on digits);
# 87 on digits since duplicates' gradients are added to their originals' first (a `_foreach_add` counts once: on
# a GPU it is one multi-tensor kernel); the reference: 2,062 / 7,081 / ~25,000. Since the assembly and its adjoint
# are `embedding_bag`s (each ~8 aten calls inside: allocations of its bookkeeping outputs): 91 / 99 / 108.
# Since classes are also split by whether their items can be read in place from the bank's storage order
# (`core.bank_storage`; at most twice the classes, still bounded by max_templates x row classes), and row
# classes are exact up to 4, then 6: 84 / 101 / 126.
KERNEL_BOUND = 140
# Metadata-only calls: one view per slot weight and one per slot gradient are ours; autograd's bookkeeping of a
# custom Function's view outputs adds a few more per slot (measured ~7 per slot in all), plus ~150 views of
# the per-class buffers and ~20 of the bank gradient's layers (`core.gather_adjoint.GatherAdjoint`). No kernel,
# no data.
METADATA_PER_SLOT = 8
METADATA_FIXED = 220


def aten_calls(generate, bank) -> Counter:
    """aten calls (nested ones counted) of one generation forward + backward, as torch.profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    weights = generate()  # warm: programs are built once per slot set
    grads = [torch.randn_like(w) for w in weights]
    bank.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.backward(generate(), grads)
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::") and not in_foreach(e))


def in_foreach(event) -> bool:
    """A call inside a `_foreach_*` op: on CPU its per-tensor loop, on a GPU one multi-tensor kernel (counted once,
    as the `_foreach_*` call itself)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::_foreach_"):
            return True
        parent = parent.cpu_parent
    return False


def split_calls(calls: Counter) -> tuple[int, int]:
    meta = sum(n for name, n in calls.items() if name in METADATA)
    return sum(calls.values()) - meta, meta


def test_aten_calls_of_a_generation_do_not_grow_with_slots():
    """Digits plan (the default members on 8x8 inputs) and a one-member plan with 5x fewer slots, and a plan with
    3x more slots (mixed architectures): the kernels stay under one fixed bound; the reference's grow with slots."""
    plans = {
        "one member": build_plan(traced(["wrn-10-2"], 1, 8), 0.5),
        "digits": build_plan(traced(DIGITS, 1, 8), 0.5),
        "many": build_plan(traced([*DIGITS, "wrn-28-2", "wrn-22-2", "resnet-18-8", "mobilenetv2-35"], 1, 32), 0.5),
    }
    counts = {}
    for name, plan in plans.items():
        bank = SuperWeightBank(plan, torch.Generator().manual_seed(0))
        kernels, meta = split_calls(aten_calls(bank, bank))
        old_kernels, old_meta = split_calls(aten_calls(ReferenceGenerator(bank), bank))
        counts[name] = (len(plan.slots), kernels, meta, old_kernels + old_meta)
        assert kernels <= KERNEL_BOUND, (name, counts[name])
        assert meta <= METADATA_PER_SLOT * len(plan.slots) + METADATA_FIXED, (name, counts[name])
    slots = [c[0] for c in counts.values()]
    assert max(slots) >= 15 * min(slots)  # the plans really differ in slot count
    assert counts["digits"][3] > 20 * counts["digits"][1]  # the reference issued far more: the bound means something
    assert counts["many"][3] > counts["digits"][3] > counts["one member"][3]  # and it grew with the slots


def test_ssn_aten_calls_do_not_grow_with_slots():
    for names in (["wrn-10-2"], [*DIGITS, "wrn-28-2", "mobilenetv2-35"]):
        slots = traced(names, 1, 8)
        for upsample in ("repeat", "mask"):
            for budget in (0.05, 2.0):
                plan = build_ssn_plan(slots, budget, ssn_groups(slots, "depth", 4), 4, upsample)
                bank = SSNBank(plan, torch.Generator().manual_seed(0))
                kernels, meta = split_calls(aten_calls(bank, bank))
                assert kernels <= KERNEL_BOUND, (names, upsample, budget, kernels)
                assert meta <= METADATA_PER_SLOT * len(slots) + METADATA_FIXED, (names, upsample, budget, meta)


def test_generated_weights_are_views_of_one_buffer_kept_once():
    """Issue 16 item 4: the slot weights share one storage (no second copy as block outputs), and autograd keeps
    no tensor of generated-weight size for generation's backward: it saves the parameters, the gains and the
    gathered templates (the coefficient gradient needs them), never the matmul output or the weight buffer."""
    bank = SuperWeightBank(build_plan(traced(DIGITS, 1, 8), 0.5), torch.Generator().manual_seed(0))
    weights = bank()
    storages = {w.untyped_storage().data_ptr() for w in weights}
    assert len(storages) == 1
    # generated once: duplicates (same cells, coefficient set and shape: 21 of the 56 digits slots) view their
    # original's entries, and those hold the very same numbers
    first = {}
    for w in weights:
        other = first.setdefault(w.data_ptr(), w)
        assert other.shape == w.shape and torch.equal(other, w)
    assert len(first) == 35
    # (each original starts at a multiple of the program's row unit: under one row of padding per original)
    generated = 4 * sum(w.numel() for w in first.values())
    program = bank._program(None)
    assert generated <= weights[0].untyped_storage().nbytes() < generated + 4 * program.unit * len(first)
    saved = []
    node = weights[0].grad_fn
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        saved += [t for t in getattr(n, "saved_tensors", ())]
        stack += [f for f, _ in n.next_functions]
    others = [t for t in saved if not any(t is p for p in (bank.bank, bank.coefficients, bank.gains))]
    assert [t.numel() for t in others] == [program.matmuls.t_numel]  # the templates, once
    assert program.matmuls.t_numel not in (program.numel, program.matmuls.out_numel)
    assert math.prod(weights[0].shape) == weights[0].numel()


def test_gains_changed_in_place_are_used_by_the_next_generation():
    """The per-row gains are memoised on the gains tensor's version: an in-place change (reset, checkpoint load)
    must reach the very next generation, forward and backward."""
    bank = SuperWeightBank(build_plan(traced(["wrn-10-2"], 1, 8), 0.5), torch.Generator().manual_seed(0))
    before = [w.detach().clone() for w in bank()]
    with torch.no_grad():
        bank.gains.mul_(2.0)
    after = bank()
    for a, b in zip(after, before):
        torch.testing.assert_close(a.detach(), 2.0 * b, rtol=0, atol=1e-6)
    grads = [torch.ones_like(w) for w in after]
    torch.autograd.backward(after, grads)
    doubled = bank.bank.grad.clone()
    bank.zero_grad(set_to_none=True)
    with torch.no_grad():
        bank.gains.mul_(0.5)
    torch.autograd.backward(bank(), grads)
    torch.testing.assert_close(doubled, 2.0 * bank.bank.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("used", ["originals", "duplicates", "every other"])
def test_duplicate_gradients_with_some_weights_unused(used):
    """A duplicate's gradient is added to its original's before the concatenation; where only one of the two
    (or neither) took part in the loss (autograd hands the other's gradient in as zeros), the bank gradient is
    still the reference's (digits plan: 21 duplicates, some in groups of three or more)."""
    bank = SuperWeightBank(build_plan(traced(DIGITS, 1, 8), 0.5), torch.Generator().manual_seed(0)).double()
    program = bank._program(None)
    dups = {program.weight_views.slots[d] for pairs in program.dup_rounds for d, _ in pairs}
    assert len(dups) == 21 and len(program.dup_rounds) >= 2
    pick = {"originals": lambda i: i not in dups, "duplicates": lambda i: i in dups,
            "every other": lambda i: i % 2 == 0}[used]
    grads = {}
    for name, weights in (("new", bank()), ("old", ReferenceGenerator(bank)())):
        keep = [w if pick(i) else None for i, w in enumerate(weights)]
        grads[name] = loss_grads(bank, keep)
    for x, y in zip(grads["new"], grads["old"]):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-9)


def test_slots_are_assembled_in_whole_rows_of_the_plans_unit():
    """The assembly (`core.superweight_program`) copies rows of `unit` entries: every slot starts at a multiple of
    the unit, the unit is the plan's (a subset program keeps it, so its slots' rows are the full program's), and
    only a few entries (the 1-channel stems' 9-entry cell rows) are gathered one by one."""
    from core.run_gather import MAX_FIXES

    bank = SuperWeightBank(build_plan(traced(DIGITS, 1, 8), 0.5), torch.Generator().manual_seed(0))
    full, thin = bank._program(None), bank._program(bank.plan.member_slots(3))
    assert full.unit == thin.unit == 32
    for program in (full, thin):
        assert all(o % program.unit == 0 for o in program.views.offsets)
        generated = sum(math.prod(s) for s in program.views.shapes)
        assert 0 < program.fix_at.numel() <= MAX_FIXES * generated
        assert program.rows.shape == (program.numel // program.unit, 1)
    stems = {i for i, s in enumerate(bank.plan.slots) if s.shape[1] == 1}
    fixed_slots = {full.views.slots[j] for j, o in enumerate(full.views.offsets)
                   if ((full.fix_at >= o) & (full.fix_at < o + math.prod(full.views.shapes[j]))).any()}
    assert stems & set(full.views.slots) and stems & set(full.views.slots) <= fixed_slots


def test_halves_blocks_are_one_matmul_on_the_two_halves_of_their_parameters():
    """A block with two templates over one template's worth of parameters (P_b == size_b: 23 of the 43 blocks of
    the digits members' plan at 0.5) is [a0 a1; a1 a0] @ [H0; H1] (`core.superweight_program.sw_items`): its
    gathered operand holds each of its P_b bank entries once, not twice, and the weights and gradients are the
    reference's."""
    from core.superweight_program import halves

    plan = build_plan(traced(DIGITS, 1, 8), 0.5)
    bank = SuperWeightBank(plan, torch.Generator().manual_seed(0))
    mm = bank._program(None).matmuls
    c = mm.chunk
    split = [b for b in plan.blocks if halves(b)]
    assert len(split) == 23 and len(plan.blocks) == 43
    operands = mm.t_numel + mm.view_end  # gathered + read in place (`core.bank_storage`)
    assert operands == (sum(2 * -(-(b.size // 2) // c) * c for b in split)
                        + sum(b.templates * -(-b.size // c) * c for b in plan.blocks if not halves(b)))
    assert operands < 0.85 * sum(b.templates * -(-b.size // c) * c for b in plan.blocks)
    ref = ReferenceGenerator(bank)
    new, old = bank(), ref()
    for i in sorted({i for b in split for i in range(len(plan.slots)) if b.id in bank._slot_blocks[i]}):
        torch.testing.assert_close(new[i], old[i], rtol=0, atol=1e-6, msg=f"slot {i}")
    for x, y in zip(loss_grads(bank, new), loss_grads(bank, old)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5 * max(1.0, y.abs().max().item()))


def test_the_bank_is_stored_as_the_matmuls_operands_and_read_in_place():
    """`core.bank_storage`: the direct classes' operands (most of the digits bank) are views of the bank, so only
    the rest is gathered; the order is saved with the weights (a bank loading them takes their order, and weights
    saved in logical order, before the storage order existed, load as such); a subset program (reading in place
    the classes whose kept items are still consecutive, gathering the rest) computes the full program's values
    bit for bit; after unsharing, still the reference's."""
    from core.bank_storage import logical_code

    plan = build_plan(traced(DIGITS, 1, 8), 0.5)
    bank = SuperWeightBank(plan, torch.Generator().manual_seed(0))
    mm = bank._program(None).matmuls
    assert mm.view_end > 0.75 * plan.budget and mm.t_numel < 0.3 * plan.budget
    assert sum(v is not None for v in mm.views) >= 4
    weights = [w.detach().clone() for w in bank()]
    grads = loss_grads(bank, bank())
    # the same weights from a bank stored in logical order (a checkpoint from before) and from the saved state
    legacy = {"bank": bank.logical().detach().clone(), "coefficients": bank.coefficients.detach(), "gains": bank.gains}
    for state in (bank.state_dict(), legacy):
        other = SuperWeightBank(plan, torch.Generator().manual_seed(5))
        other.load_state_dict(state)
        assert torch.equal(other.storage, state.get("storage", logical_code(len(plan.blocks))))
        for a, b in zip(other(), weights):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        g_bank, g_coef = loss_grads(other, other())
        torch.testing.assert_close(g_coef, grads[1], rtol=0, atol=1e-5)
        in_logical = [torch.cat([s._storage().theta(g, b.id) for b in plan.blocks])  # (logical order, both)
                      for s, g in ((other, g_bank), (bank, grads[0]))]
        torch.testing.assert_close(*in_logical, rtol=0, atol=1e-5)
    # subsets (the default two Ray workers' member groups, one thin member) read their still-consecutive classes
    # in place and gather the rest: bit for bit the full program's weights and gradients
    for members in ((0,), (1, 2, 3), (3,)):
        ids = sorted(i for m in members for i in plan.member_slots(m))
        sub_mm = bank._program(ids).matmuls
        assert sum(v is not None for v in sub_mm.views) >= 2 and sub_mm.view_end > 0.2 * plan.budget
        got = [loss_grads(bank, [w if i in ids else None for i, w in enumerate(program)])
               for program in (bank(slots=ids), bank())]
        assert all(torch.equal(bank(slots=ids)[i], weights[i]) for i in ids)
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    # a code that is not an order of this plan's blocks is refused with one line
    for bad in (bank.storage.flip(0), bank.storage[:-1]):
        with pytest.raises(RuntimeError, match="storage"):
            SuperWeightBank(plan).load_state_dict({**bank.state_dict(), "storage": bad.clone()})
    # unsharing keeps the bank (and its order); the new classes read in place what is still consecutive
    from core.grouping import coefficient_transfer

    code = bank.storage.clone()
    unshared = build_plan(plan.slots, plan.budget, share_coefficients=False, group_of=plan.slot_group)
    index = coefficient_transfer(plan, unshared)
    bank.rebind(unshared, torch.nn.Parameter(bank.coefficients.detach()[index].clone()))
    assert torch.equal(bank.storage, code) and bank._program(None).matmuls.view_end > 0
    for a, b in zip(bank(), ReferenceGenerator(bank)()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # `restore` (what unsharing calls next) stores it in the new classes' order, moving a bank-shaped state
    # (the optimizer's momentum) alike: the logical bank and state are the same numbers, more classes are read in
    # place, the weights are what they were, and the code is the one a new bank of this plan chooses
    before_views = sum(v is not None for v in bank._program(None).matmuls.views)
    theta, weights = bank.logical().detach().clone(), [w.detach().clone() for w in bank()]
    momentum = torch.randn(bank.bank.shape, generator=torch.Generator().manual_seed(7))
    momentum_logical = bank._storage().logical(momentum, [b.id for b in unshared.blocks])
    assert bank.restore(momentum) and not bank.restore(momentum)
    assert torch.equal(bank.storage, SuperWeightBank(unshared).storage) and not torch.equal(bank.storage, code)
    assert torch.equal(bank.logical(), theta)
    assert torch.equal(bank._storage().logical(momentum, [b.id for b in unshared.blocks]), momentum_logical)
    assert sum(v is not None for v in bank._program(None).matmuls.views) > before_views
    for a, b in zip(bank(), weights):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
