"""EPI inside Hugging Face's ``Trainer``: one callback, no optimizer proxy (optional extra: ``pip install -e '.[hf]'``).

Three lines::

    from epi_mini.hf import EPICallback
    trainer = Trainer(model, args, train_dataset=data, callbacks=[EPICallback(isolation_ratio=0.1, warmup_steps=100)])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True): EPI resumes too

What the callback does, at each of the Trainer's events:

* ``on_train_begin`` -- builds an :class:`~epi_mini.epi.EvolvingIsolation` over the Trainer's model (or takes
  the one you give it) and attaches it to the torch optimizer that accelerate's ``AcceleratedOptimizer``
  wraps. The Trainer keeps calling its own ``optimizer.step()``; accelerate's wrapper, its GradScaler (fp16),
  gradient accumulation and the Trainer's gradient clipping stay in charge, and every step the inner optimizer
  actually takes is masked (a step the scaler skips reaches neither EPI's importance nor its step count, also
  with the Trainer's default fused AdamW, which the scaler steps with a skip flag). When the Trainer resumes from a
  checkpoint, the EPI state saved in that checkpoint is loaded, so warm-up does not start again.
* ``on_save`` -- writes the EPI state (importance EMA, isolated set, step count, history) as ``epi_state.pt``
  into the checkpoint folder the Trainer has just written (atomically; read back with ``weights_only=True``).
* ``on_log`` -- adds ``epi/isolated_fraction`` and, from the second refresh on, ``epi/jaccard_previous``
  (overlap of the last refresh's set with the one before) to every training log line.
* ``on_train_end`` -- detaches, so the optimizer steps plainly again.

``transformers`` is imported here only: ``import epi_mini`` and every other module work without it.
"""
import inspect
import io
import os

import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # the optional extra is not installed
    raise ImportError("epi_mini.hf needs the optional extra 'hf' (transformers and accelerate): "
                      "pip install -e '.[hf]' in an epi-mini checkout, or pip install transformers accelerate; "
                      f"the rest of epi_mini works without it ({e})") from None

from .adaptive import AdaptiveIsolation
from .checkpoint import atomic_write_bytes
from .epi import EvolvingIsolation, check_options
from .isolation import MaskedUpdate

EPI_STATE_NAME = "epi_state.pt"


def isolation_class(options):
    """:class:`~epi_mini.adaptive.AdaptiveIsolation` for ``mask_interval="auto"``, else EvolvingIsolation."""
    return AdaptiveIsolation if options.get("mask_interval") == "auto" else EvolvingIsolation


def check_isolation_options(options):
    """Raise ``TypeError`` for an option EPI does not have and ``ValueError`` for a value out of range, now,
    rather than when ``trainer.train()`` starts."""
    cls = isolation_class(options)
    known = {**inspect.signature(EvolvingIsolation).parameters, **inspect.signature(cls).parameters}
    unknown = sorted(set(options) - set(known) - {"params"})
    if unknown or "params" in options:
        raise TypeError(f"EPICallback: unknown option(s) {unknown or ['params']}; EPI's options are "
                        f"{sorted(set(known) - {'params', 'options'})}")
    check_options(**{k: v for k, v in options.items() if k in inspect.signature(check_options).parameters})


class EPICallback(TrainerCallback):
    """Runs EPI inside ``transformers.Trainer`` (see the module's docstring for what happens when).

    ``EPICallback(**options)`` builds ``EvolvingIsolation(model, **options)`` when training begins
    (``mask_interval="auto"``: :class:`~epi_mini.adaptive.AdaptiveIsolation`). Or pass ``isolation=``: a
    function ``model -> isolation`` (called at each ``trainer.train()``), or an isolation you built over the
    Trainer's model yourself. ``resume_from``: the checkpoint folder to take EPI state from when the Trainer
    resumes; by default the one ``resume_from_checkpoint`` names in ``args``, else ``<output_dir>/checkpoint-<step>``.
    After training, ``callback.isolation`` is the isolation (masks, scores, ``history``).
    """

    def __init__(self, isolation=None, *, resume_from=None, **options):
        if isolation is not None and options:
            raise TypeError("EPICallback: pass either isolation= (an isolation, or a function model -> isolation) or "
                            f"EPI's options, not both (got isolation and {sorted(options)})")
        if isolation is not None and not (isinstance(isolation, MaskedUpdate) or callable(isolation)):
            raise TypeError(f"EPICallback: isolation= must be an EvolvingIsolation (or another MaskedUpdate) or a "
                            f"function model -> isolation, got {type(isolation).__name__}")
        if isolation is None:
            check_isolation_options(options)
            cls = isolation_class(options)
            isolation = lambda model: cls(model, **options)  # noqa: E731
        self._given = isolation if isinstance(isolation, MaskedUpdate) else None
        self._factory = None if self._given is not None else isolation
        self.resume_from = resume_from
        self.isolation = self._given

    # --- training begins: build, restore, attach -------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("EPICallback.on_train_begin got no model or optimizer from the Trainer: it must be "
                               "used as a transformers.Trainer callback (Trainer(..., callbacks=[EPICallback(...)]))")
        if self._factory is not None:
            self.isolation = self._factory(model)
            if not isinstance(self.isolation, MaskedUpdate):
                raise TypeError(f"EPICallback: the isolation function returned {type(self.isolation).__name__}, "
                                "not an EvolvingIsolation (or another MaskedUpdate)")
        if state.global_step > 0:  # the Trainer resumed from a checkpoint: so does EPI
            self._restore(args, state)
        self.isolation.detach()  # a second trainer.train() on a given isolation: attach afresh
        self.isolation.attach(optimizer)  # accelerate's wrapper: attached through the torch optimizer inside

    def on_train_end(self, args, state, control, **kwargs):
        if self.isolation is not None:
            self.isolation.detach()

    # --- checkpoints -----------------------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # every process holds the same EPI state (DDP averages gradients)
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(f"EPICallback.on_save: the Trainer's checkpoint folder {folder} does not exist (a "
                               "hyperparameter search writes elsewhere, which EPICallback does not support)")
        buffer = io.BytesIO()
        torch.save({"global_step": state.global_step, "isolation": self.isolation.state_dict()}, buffer)
        atomic_write_bytes(os.path.join(folder, EPI_STATE_NAME), buffer.getvalue())

    def _restore(self, args, state):
        candidates = [self.resume_from] if self.resume_from is not None else [
            *([args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []),
            os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        paths = [os.path.join(str(c), EPI_STATE_NAME) for c in candidates]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(
                f"EPICallback: the Trainer resumed at step {state.global_step}, but no EPI state was found (looked "
                f"for {' and '.join(paths)}). Without it EPI would start its warm-up again and isolate nothing "
                "until then: pass EPICallback(..., resume_from=<the checkpoint folder>), or resume from a "
                "checkpoint written with EPICallback")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("global_step") != state.global_step:
            raise ValueError(f"EPICallback: {path} was saved at step {saved.get('global_step')}, but the Trainer "
                             f"resumed at step {state.global_step}: resume from the checkpoint it belongs to")
        self.isolation.load_state_dict(saved["isolation"])

    # --- logs ------------------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.isolation is None or logs is None or "loss" not in logs:  # training log lines only
            return
        history = getattr(self.isolation, "history", [])
        entries = {"epi/isolated_fraction": self.isolation.isolated_fraction()}
        if history and history[-1]["jaccard_previous"] is not None:
            entries["epi/jaccard_previous"] = history[-1]["jaccard_previous"]
        logs.update(entries)
        # Trainer.log has already stored a copy of this line in state.log_history; complete that copy too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)
