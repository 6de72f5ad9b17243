"""What the training loop asks of a method, and the one SFT step every training in the project goes through.

The loop (:func:`epi_mini.train.fit`) never calls ``optimizer.step()`` itself: it calls the hooks of an
:class:`UpdateStrategy`. Every hook has a default that does nothing special, so a method overrides only
what it changes: plain SFT (:class:`PlainUpdate`) overrides nothing; EPI replaces ``step`` with a masked
step; CPI-FT also uses ``begin_stage`` to freeze the cores of earlier stages. The loop calls, in order::

    begin_stage(i)                      as stage i starts (i = 0, 1, ...)
    observe(batch, loss_fn)             after every finite backward pass, with the batch it came from
    step(optimizer) -> bool             right after (True: the optimizer stepped)
    end_stage(i)                        after stage i's last step
    isolated_fraction() -> float        at the end of every stage, for the record
    summary() -> dict                   once, at the end (merged into the record under "strategy")
    state_dict() / load_state_dict(s)   with every checkpoint, and on resume

:func:`sft_step` is one update: loss, backward, gradient clipping, and the strategy's step, skipped when the
loss or the gradient is not finite. The loop and CPI-FT's probe fine-tunes both train through it.
"""
import math

import torch


class UpdateStrategy:
    """The interface between the training loop and a method; every hook has a no-op (plain SFT) default."""

    def begin_stage(self, stage):
        pass

    def observe(self, batch, loss_fn):
        """A method that needs more than the batch's gradient (e.g. the gradient of some rows only) computes
        it here; ``loss_fn(batch)`` is the loop's loss function."""

    def step(self, optimizer):
        optimizer.step()
        return True

    def end_stage(self, stage):
        pass

    def isolated_fraction(self):
        return 0.0

    def summary(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class PlainUpdate(UpdateStrategy):
    """Plain SFT: every parameter is updated by the optimizer."""


def sft_step(loss_fn, batch, parameters, optimizer, strategy, grad_clip=0.0, sync=True):
    """One update: ``loss_fn(batch)``, backward, clip the gradient norm to ``grad_clip`` (0 = no clipping),
    then ``strategy.observe(batch, loss_fn)`` and ``strategy.step(optimizer)`` -- only if the loss and the
    gradient norm are finite -- and clear the gradients. Returns the loss value, or None when the step was
    skipped (weights, optimizer moments and importance scores are then exactly as they were).

    ``sync=False``, for an accelerator and an optimizer that can skip its own update by a device flag (a fused
    AdamW): the decision stays on the device -- ``optimizer.found_inf`` is set, as a GradScaler does, and the
    optimizer and EPI skip by it -- and the return value is ``(loss, found_inf)``, two 0-dim device tensors
    that the caller reads back only when it logs. Reading them at every step would stall the device.
    """
    loss = loss_fn(batch)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip or float("inf"))
    if not sync and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
        try:
            strategy.observe(batch, loss_fn)
            strategy.step(optimizer)
        finally:
            found_inf = optimizer.__dict__.pop("found_inf")
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), found_inf
    value = loss.item()
    finite = math.isfinite(value) and math.isfinite(norm.item())
    if finite:
        strategy.observe(batch, loss_fn)
        strategy.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return value if finite else None
