"""Batched weight generation: a number of kernels per step that does not grow with slots, cells or blocks.

DESIGN.md step 6 says "one matmul per block, then cells are assembled into slot weights". Done literally
(one matmul, one window stack, one concatenation per block and per slot, in Python) that is O(blocks +
slots x cells) tensor operations per step: ~7,000 aten calls for the digits plan, each a kernel launch on
a GPU. Here a *program* (pure index tensors, built once per plan, requested slot set and device) runs
the same arithmetic in a handful of kernels:

1. **Chunked matmuls.** Every block's product alpha_b [R_b, K_b] @ templates_b [K_b, size_b] is cut along
   its columns into chunks of `C` entries (C a power of two chosen per plan, padding < 2%): chunk j is
   alpha_b @ templates_b[:, jC:(j+1)C]. All chunks of all blocks with the same (K, R) class are one `bmm`
   [n, R, K] @ [n, K, C], so there is one bmm per (K, R) class (a handful, bounded by max_templates and
   the number of coefficient sets per block, never by slots or blocks). A block whose templates are
   disjoint slices of its parameters (`chunked_matmul.direct`; a `halves` block is one: its product is
   [a0 a1; a1 a0] @ [H0; H1] on the two halves of theta_b) has an operand [chunks, K, C] that is a permutation
   of theta_b, and the bank is *stored* in that order (`core.bank_storage`): such classes' operands are views
   of the bank and their bmm writes the bank gradient. The other classes' templates are one gather of the
   bank (index tensors carry the cyclic windows, wrap included); coefficients one gather of the flat
   coefficient vector (rows padded to the class's R read any coefficient: their output is never read, so
   their gradient is exactly zero).
2. **Assembly** (SuperWeights). A slot weight is a row-major concatenation of grid cells; each slot starts at a
   multiple of a row unit u (16-128 entries, chosen once per plan), and cut into rows of u entries almost every
   row is a whole row of the matmul output's [-1, u] view. One `embedding_bag` (bags of one row, each slot's
   fixed gain as the per-sample weight) copies every such row into one flat weight buffer and applies the gains
   in the same pass; the few other entries (a 1-channel stem's 9-entry cell rows) are gathered one by one. Slot
   weights are views of that buffer (in a bank made for channels_last convolutions, its conv weights are
   channels_last views: `core.superweight_program._slot_index`). Duplicates (corresponding slots of one shape read the same cells with the
   same coefficient set) are generated once and viewed twice. SSN wavg slots are blocks with R = 1 whose chunks
   are consecutive: the matmul output (times the gains) *is* their weight buffer; repeat and mask slots are one
   gather of the bank.
3. **Backward** in the same few kernels: one `_foreach_add` of each duplicate's gradient to its original's (one
   multi-tensor kernel on a GPU), one concatenation of the originals' gradients, one `embedding_bag` whose bag
   per matmul-output row is the weight rows that read it (gains as weights: the adjoint of the assembly and the
   gain multiply in one pass) plus one `scatter_add_` for the entries done one by one, two bmm per class (a
   stored class's template gradient is the bank gradient in place), the adjoint of the template gather into
   the rest of the bank gradient (`core.gather_adjoint.GatherAdjoint`: each gradient
   entry's first reader is one gather by runs written straight into the gradient, no zero fill; readers past the
   first a few more layers added row-wise; parallel, where an entry-wise scatter_add_ runs on one CPU thread),
   and one `scatter_add_` into the coefficient gradient.

Memory (issue 16 item 4). The matmul output is a temporary: the assembly's backward needs only indices,
so it is freed as soon as the slot weights are gathered; generated weights exist once, as the flat buffer
the slot weights view. The gathered templates (those not read in place) are kept for backward (the coefficient gradient needs them;
gathering again cost ~1 ms and kept the peak where it was, since the peak comes in backward where the slot
gradients live). The price is persistent index tensors (int32, built once per plan): one entry per run of
template entries and of gradient entries, two per weight row (its matmul-output row; its place in a bag of the
adjoint), and the few entries done one by one.

Bit-exactness. The layout (chunk size, classes, which block in which class) comes from the whole plan,
and a program for a subset of slots (a member-parallel worker's) only drops chunks, so each kept chunk is
the same bmm matrix at the same alignment (where the full program reads a class in place and the subset
gathers its kept chunks, the copies hold the same values at the same 2 KB alignment; originals are laid out in
the whole plan's order, so every adjoint bag sums its readers in the same order); the row unit comes from the whole plan too and every slot starts at a
multiple of it, so a slot's rows are assembled the same way in every program: subset weights and gradients are
bit for bit the full ones.
Metadata-only operations (one `as_strided` view per slot weight, one flattening view per slot gradient)
are the only per-slot aten calls left: they launch no kernel.

Where the code is (this module is the way in and re-exports their public names): `core.chunked_matmul`
(step 1, and the bmm half of step 3), `core.gather_adjoint` (the bank gradient, in layers), `core.run_gather`
(gathers by runs: the templates, the adjoint's layers), `core.flat_views` (slot weights as views of one flat
buffer, their gradients concatenated), `core.superweight_program` (step 2 and its backward for SuperWeights) and
`core.ssn_program` (the SSN program), `core.bank_storage` (the order the SuperWeight bank is stored in).
"""

from __future__ import annotations

from .chunked_matmul import (
    CHUNKS,
    MAX_PADDING,
    SCATTER,
    Item,
    MatmulLayout,
    Matmuls,
    build_matmuls,
    chunk_size,
    matmul_layout,
    row_class,
)
from .flat_views import Views
from .run_gather import INDEX
from .ssn_program import SSNProgram, run_ssn, ssn_items, ssn_program, ssn_wavg_starts
from .superweight_program import SWProgram, run_superweights, sw_items, sw_program, sw_rows

__all__ = [
    "CHUNKS",
    "INDEX",
    "Item",
    "MAX_PADDING",
    "MatmulLayout",
    "Matmuls",
    "SCATTER",
    "SSNProgram",
    "SWProgram",
    "Views",
    "build_matmuls",
    "chunk_size",
    "matmul_layout",
    "row_class",
    "run_ssn",
    "run_superweights",
    "ssn_items",
    "ssn_program",
    "ssn_wavg_starts",
    "sw_items",
    "sw_program",
    "sw_rows",
]
