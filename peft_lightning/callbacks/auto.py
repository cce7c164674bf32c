"""``auto``: the strategy that chooses the layer groups that train from the gradient probe (``probe.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from peft_lightning.callbacks.strategy_base import Phase, State, Strategy
from peft_lightning.errors import UsageError


class Auto(Strategy):
    """Chooses the layer groups that train from a gradient probe (``callbacks/probe.py``; docs/layers.md).

    - ``depth`` (the default, the best on the mean in ``benchmarks.run choose``): LP-FT with a measured depth (Kumar
      et al., ICLR 2022). The head trains alone for the first ``lp`` of the run's steps (a linear probe: a new
      head sends only noise into the body), then the probe measures each group's *signal* (the share of a batch's
      gradient that is the expected gradient), and the fewest groups from the top that hold ``coverage`` of the
      body's signal train with the head, their LR rising from near 0 over as many steps as the linear probe took
      (``ramp_steps``). What stays frozen below costs no backward pass and is cached where epochs repeat. When no
      group below the head reaches a signal of ``floor`` (the probe cannot tell them apart), every group trains.
    - ``select``: the groups whose RGN over the largest below the head is at least ``threshold`` (or the ``count``
      highest) train, and the head.
    - ``scale``: every group trains at ``RGN / max(RGN)`` times its LR, re-measured from the training gradients
      every ``every`` steps (Auto-RGN, Lee et al., ICLR 2023).

    Args:
        mode: ``depth`` (a linear probe, then the fewest top groups that hold ``coverage`` of the gradient signal),
            ``select`` (the groups of highest RGN) or ``scale`` (every group at its share of the highest RGN).
        threshold: ``select``: the normalised RGN a group needs to train.
        count: ``select``: train the ``count`` groups of highest RGN instead of a threshold.
        every: ``scale``: steps between two re-measurements of the LR scales (0: only the probe's).
        probe_after: training steps of the head alone before the probe (0: probe before the first step; ``depth``:
            0 means ``lp`` of the run).
        lp: ``depth``: the share of the run's optimizer steps in which the head trains alone before the probe.
        coverage: ``depth``: the share of the body's gradient signal the groups that train must hold.
        floor: ``depth``: a body whose every group's signal is below this (the probe cannot tell the groups apart)
            trains every group after the linear probe (LP-FT).
        probe_batches: training batches the gradient probe runs forward and backward to measure each group's
            gradient signal and relative gradient norm.
    """

    needs_probe = True

    def __init__(
        self,
        mode: Literal["depth", "select", "scale"] = "depth",
        threshold: float = 0.5,
        count: int | None = None,
        every: int = 0,
        probe_after: int = 0,
        lp: float = 0.1,
        coverage: float = 0.6,
        floor: float = 0.02,
        probe_batches: int = 8,
    ) -> None:
        if mode not in ("depth", "select", "scale"):
            raise UsageError(f"mode must be depth, select or scale, got {mode!r}")
        if not 0 <= threshold <= 1 or (count is not None and count < 1) or min(every, probe_after) < 0:
            raise UsageError("threshold must be in [0, 1], count >= 1 or None, every and probe_after >= 0")
        if not (0 <= lp < 1 and 0 < coverage <= 1 and 0 <= floor < 1) or probe_batches < 1:
            raise UsageError("lp must be in [0, 1), coverage in (0, 1], floor in [0, 1), probe_batches >= 1")
        self.mode, self.threshold, self.count, self.every = mode, threshold, count, every
        self.lp, self.coverage, self.floor = lp, coverage, floor
        self.probe_batches = probe_batches
        self.warmup_steps = probe_after  # the head trains alone this many steps, then the probe runs
        self.rescale_every = every if mode == "scale" else 0  # the LR scales follow the training gradients

    def plan(self, total_steps: int) -> None:
        """``depth``: the linear probe's share of the run in steps, unless ``probe_after`` gave a number."""
        if self.mode == "depth":
            if not self.warmup_steps:
                self.warmup_steps = round(self.lp * total_steps)  # 0 (a run of a few steps): the probe comes first
            self.ramp_steps = self.warmup_steps  # the body warms up as long as the head trained alone

    @staticmethod
    def normalised(probe: dict[str, float], groups: Sequence[str]) -> dict[str, float]:
        """Each group's figure over the largest of the groups below the head; the head gets 1."""
        body = {g: probe.get(g, 0.0) for g in groups[:-1]}
        top = max(body.values(), default=0.0)
        return {**{g: (v / top if top > 0 else 1.0) for g, v in body.items()}, groups[-1]: 1.0}

    def resolves(self, signal: dict[str, float], groups: Sequence[str]) -> bool:
        """Whether some group below the head has a signal of at least ``floor`` (else the probe cannot rank them)."""
        return max((signal.get(g, 0.0) for g in groups[:-1]), default=0.0) >= self.floor

    def cut(self, signal: dict[str, float], groups: Sequence[str]) -> list[str]:
        """``depth``: the fewest top groups that hold ``coverage`` of the body's signal, and the head."""
        body = list(groups[:-1])
        shares = [max(0.0, signal.get(g, 0.0)) for g in body]
        total = sum(shares)
        if self.coverage >= 1 or not self.resolves(signal, groups):
            return list(groups)  # all of the signal, or a signal the probe cannot resolve: every group (LP-FT)
        held = 0.0
        for i in range(len(body) - 1, -1, -1):
            held += shares[i]
            if held >= self.coverage * total:
                return list(groups[i:])
        return list(groups)

    def phase(self, state: State) -> Phase:
        if not state.probe:  # before the probe: the head's warm-up, or (``show_groups``) every candidate
            if self.mode == "depth":  # the linear probe
                return Phase(state.groups[-1:])
            return Phase(state.groups[-1:] if self.warmup_steps else list(state.groups))
        if self.mode == "depth":
            return Phase(self.cut(state.signal or {}, state.groups))
        scales = self.normalised(state.probe, state.groups)
        if self.mode == "scale":
            return Phase(list(state.groups), group_lr_scales=scales)
        body = state.groups[:-1]
        ranked = sorted(body, key=lambda g: -scales[g])
        chosen = set(ranked[: self.count]) if self.count else {g for g in body if scales[g] >= self.threshold}
        chosen.add(state.groups[-1])
        return Phase([g for g in state.groups if g in chosen])
