"""What a valid config is: the values each choice key accepts, numeric ranges with their one-line errors,
and `ConfigChecks`, the base class that gives `ensemble.config.Config` its `validate()`.

The checks live on a base class rather than in functions taking a `Config` so that this module needs
nothing from `ensemble.config` (which imports it): the import direction stays one way.
"""

from __future__ import annotations

import math
from typing import Self

from core.errors import SuperweightsError
from core.ssn import GROUP_MODES, UPSAMPLERS

METHODS = ("superweights", "ssn", "full")  # ensemble.methods.METHODS has one entry per name (tested)
SCHEDULES = ("greedy", "member", "explicit")
EXIT_SCORES = ("max_prob", "entropy")  # anytime/early_exit.py computes them; listed here so configs are checked

# (low, high, low excluded, high excluded); None = unbounded on that side
AT_LEAST_0 = (0, None, False, False)
AT_LEAST_1 = (1, None, False, False)
AT_LEAST_2 = (2, None, False, False)
ABOVE_0 = (0, None, True, False)
OPEN_UNIT = (0, 1, True, True)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_range(key: str, value: int | float, low, high, low_open: bool, high_open: bool) -> None:
    """One-line error naming key, value and range unless the value is inside it (NaN and infinities never are)."""
    finite = isinstance(value, int) or math.isfinite(value)
    ok = finite and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise SuperweightsError(f"{key} must be {_range_text(low, high, low_open, high_open)}, got {value}")


class ConfigChecks:
    """`validate()` for `Config` (which has the sections `data`, `ensemble`, `bank`, `train`, `anytime`,
    `grouping`, `debug` these checks read). The order of the checks is the order of the errors a config with
    several mistakes reports first."""

    def validate(self) -> Self:
        if self.bank.method not in METHODS:
            raise SuperweightsError(f"bank.method must be one of {', '.join(METHODS)}, got {self.bank.method!r}")
        if self.bank.method == "ssn":
            if self.bank.upsample not in UPSAMPLERS:
                raise SuperweightsError(f"bank.upsample must be one of {', '.join(UPSAMPLERS)}, got {self.bank.upsample!r}")
            if self.bank.ssn_groups not in GROUP_MODES:
                raise SuperweightsError(f"bank.ssn_groups must be one of {', '.join(GROUP_MODES)}, got {self.bank.ssn_groups!r}")
            if self.bank.groups < 1:
                raise SuperweightsError(f"bank.groups must be >= 1, got {self.bank.groups}")
        if self.bank.grouping not in ("depth", "gradient"):
            raise SuperweightsError(f"bank.grouping must be depth or gradient, got {self.bank.grouping!r}")
        # Keys of the SuperWeight method's learning steps: honoured by the training loop, or refused here.
        if self.bank.method != "superweights":
            for key, value, default in (("bank.grouping", self.bank.grouping, "depth"),
                                        ("bank.unshare_epoch", self.bank.unshare_epoch, 0)):
                if value != default:
                    raise SuperweightsError(f"{key}={value!r} is a SuperWeights step: it needs bank.method = "
                                            f"\"superweights\", not {self.bank.method!r}")
        if self.bank.unshare_epoch < 0 or self.bank.unshare_epoch > self.train.epochs:
            raise SuperweightsError(f"bank.unshare_epoch must be between 0 (never) and train.epochs "
                                    f"({self.train.epochs}), got {self.bank.unshare_epoch}")
        if self.bank.unshare_epoch and not self.bank.share_coefficients:
            raise SuperweightsError("bank.unshare_epoch needs bank.share_coefficients = true: with unshared "
                                    "coefficients there is nothing to unshare")
        self._check_ranges()
        if not self.ensemble.members:
            raise SuperweightsError("ensemble.members is empty: name at least one member")
        exits = self.ensemble.exits
        if isinstance(exits, str) and exits not in ("all", "none"):
            raise SuperweightsError(f'ensemble.exits must be "all", "none" or a list of stage indices, got {exits!r}')
        if not isinstance(exits, str) and any(i < 0 for i in exits):
            raise SuperweightsError(f"ensemble.exits: stage indices must be >= 0, got {list(exits)}")
        weights = self.ensemble.exit_weights
        if any(not (math.isfinite(w) and w >= 0) for w in weights):
            raise SuperweightsError(f"ensemble.exit_weights must be >= 0, got {list(weights)}")
        if weights and not any(weights):  # a zero loss trains nothing
            raise SuperweightsError(f"ensemble.exit_weights must not all be 0, got {list(weights)}")
        if self.anytime.schedule not in SCHEDULES:
            raise SuperweightsError(f"anytime.schedule must be one of {', '.join(SCHEDULES)}, got {self.anytime.schedule!r}")
        if self.anytime.exit_score not in EXIT_SCORES:
            raise SuperweightsError(f"anytime.exit_score must be one of {', '.join(EXIT_SCORES)}, "
                                    f"got {self.anytime.exit_score!r}")
        if self.anytime.schedule == "explicit" and not self.anytime.order:
            raise SuperweightsError("anytime.schedule = \"explicit\" needs anytime.order (a member index per step)")
        n = len(self.ensemble.members)
        bad = [m for m in self.anytime.order if not 0 <= m < n]
        if bad:
            raise SuperweightsError(f"anytime.order: member index {bad[0]} does not exist (members 0..{n - 1})")
        return self

    def _check_ranges(self) -> None:
        """Every numeric key against its valid range: a one-line error here, before any data, plan or worker.
        ray.* keys are checked by ray_jobs.options.RayOptions.validate (they may come from flags too), serve.*
        keys by ServeConfig.check (from the loader)."""
        d, b, g, t = self.data, self.bank, self.grouping, self.train
        checks: list[tuple[str, int | float, tuple]] = [
            # both fractions split a pool stratified; 0 would leave an empty split that training cannot
            # evaluate on, 1 an empty pool (the loaders' own checks stay as a second line of defence)
            ("data.val_fraction", d.val_fraction, OPEN_UNIT),
            ("data.test_fraction", d.test_fraction, OPEN_UNIT),  # digits only, checked for every dataset
            ("data.train_per_class", d.train_per_class, AT_LEAST_0),  # 0 = all images
            ("data.image_size", d.image_size, AT_LEAST_0),  # resize side in pixels, 0 = native
            ("bank.depth_bins", b.depth_bins, AT_LEAST_1),
            # SuperWeights: every slot mixes >= 2 templates (no hard ties, DESIGN step 4); SSN wavg may use 1
            ("bank.max_templates", b.max_templates, AT_LEAST_2 if b.method == "superweights" else AT_LEAST_1),
            ("bank.unshare_batches", b.unshare_batches, AT_LEAST_1),
            # a cosine threshold: <= -1 never unshares; above 1 every pair conflicts (tests use 1.01 for that)
            ("bank.unshare_threshold", b.unshare_threshold, (-1.0, 1.01, False, False)),
            ("bank.groups", b.groups, AT_LEAST_1),  # ssn learned: k-means clusters
            ("bank.pretrain_steps", b.pretrain_steps, AT_LEAST_1),
            ("grouping.warmup_epochs", g.warmup_epochs, AT_LEAST_1),
            ("grouping.batches", g.batches, AT_LEAST_1),
            ("grouping.threshold", g.threshold, (-1.0, 1.0, False, False)),  # a cosine similarity
            ("grouping.threshold_step", g.threshold_step, ABOVE_0),  # lowered by a positive step, else no progress
            ("grouping.tries", g.tries, AT_LEAST_1),
            ("train.epochs", t.epochs, AT_LEAST_1),
            ("train.batch_size", t.batch_size, AT_LEAST_1),
            ("train.lr", t.lr, ABOVE_0),  # no upper bound: a diverging lr is caught at its first non-finite step
            ("train.momentum", t.momentum, (0.0, 1.0, False, True)),  # SGD; 1 never forgets a gradient
            ("train.weight_decay", t.weight_decay, AT_LEAST_0),
            ("train.seed", t.seed, (0, 2**63 - 1, False, False)),  # torch generators take 64-bit seeds
            ("train.eval_batch_size", t.eval_batch_size, AT_LEAST_0),  # 0 = automatic
            ("debug.crash_at_epoch", self.debug.crash_at_epoch, AT_LEAST_0),  # 0 = never
        ]
        # bank.budget: an int counts parameters (>= 1), a float is a fraction of the slot weights (> 0); the
        # plan names the true minimum, the memory check (ensemble.planning.check_memory) the maximum
        checks.append(("bank.budget", b.budget, AT_LEAST_1 if isinstance(b.budget, int) else ABOVE_0))
        for key, value, (low, high, low_open, high_open) in checks:
            check_range(key, value, low, high, low_open, high_open)
        for i, m in enumerate(self.anytime.order):
            if m < 0:
                raise SuperweightsError(f"anytime.order entries are member indices >= 0, got {m} at position {i}")
