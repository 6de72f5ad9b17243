"""EPI under fp16 mixed precision on a GPU, where the optimizer is fused. Run on demand (not a test), on a machine
with CUDA:

    python benchmarks/gpu_amp.py                 # on a GPU
    python benchmarks/gpu_amp.py --device cpu    # the same checks on the CPU, with a CPU GradScaler (2-3 minutes)

Without CUDA (and without ``--device cpu``) it says so and exits 0, having checked nothing. It was written, and
run with ``--device cpu``, on a machine without a GPU: its first run on one is still to come. The unit tests
(``tests/test_epi_in_your_loop.py``, ``tests/test_hf.py``) check the same on the CPU; this script is for the
kernels that only a GPU runs (fused AdamW's CUDA kernel, fp16 autocast, accelerate's own GradScaler).

A ``GradScaler`` does not unscale for a fused optimizer, nor skip its step on an overflow: it hands it the scale
and a device flag, ``found_inf``, and the fused kernel unscales and skips. Every check below is an ``assert``:

1. **A textbook fp16 loop** (``torch.autocast`` + ``GradScaler`` + ``AdamW(fused=True)``, attached), with one
   forced overflow besides those fp16 produces: at every step the isolated entries are bit-identical; EPI
   counts only the steps the scaler let through (a skip is seen as the scale dropping); its importance after
   the first step is exactly the EMA of the *unscaled* squared gradients, and at the end within 10x of an
   unfused twin's (scaled gradients would put it ~1e9x higher).
2. **The Hugging Face Trainer** with ``fp16=True`` and its default optimizer (``adamw_torch_fused``), EPI by
   :class:`~epi_mini.hf.EPICallback`, one forced overflow: at every optimizer step the isolated entries are
   bit-identical; EPI's steps are the Trainer's minus the skipped ones; the importance is unscaled.
"""
import sys
import tempfile

import torch

from epi_mini.config import OptionParser
from epi_mini.epi import EvolvingIsolation

STEPS, OVERFLOW_AT = 60, 25


def encoder(device):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, dropout=0.0, batch_first=True)
    return torch.nn.Sequential(torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
                               torch.nn.Linear(128, 16)).to(device)


def fp16_loop(device, fused):
    """Returns (isolation, steps the scaler skipped, isolated entries that moved, first-step check, max score)."""
    model = encoder(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=fused)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 16)
    epi = EvolvingIsolation(model, isolation_ratio=0.1, mask_interval=10, warmup_steps=5, ema_beta=0.9).attach(opt)
    gen = torch.Generator().manual_seed(0)
    skipped, moved, first_ok = 0, 0, None
    for step in range(STEPS):
        x = torch.randn(16, 32, 128, generator=gen).to(device)
        y = torch.randn(16, 32, 16, generator=gen).to(device)
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step == OVERFLOW_AT:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        expected = {n: 0.1 * (p.grad.float() / scaler.get_scale()) ** 2 for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < scale
        masks = epi.isolated
        moved += sum(int((p.detach() != before[n])[masks[n]].sum()) for n, p in model.named_parameters())
        if first_ok is None and scaler.get_scale() >= scale:  # the first step taken: the EMA is 0.1 * g**2
            first_ok = all(torch.allclose(epi.scores[n], e, rtol=1e-5, atol=0) for n, e in expected.items())
    epi.detach()
    return epi, skipped, moved, first_ok, max(float(s.max()) for s in epi.scores.values())


def check_loop(device):
    fused_epi, skipped, moved, first_ok, top = fp16_loop(device, fused=True)
    plain_epi, plain_skipped, plain_moved, _, plain_top = fp16_loop(device, fused=False)
    print(f"1. fp16 loop, fused AdamW: {STEPS} steps, {skipped} skipped by the scaler; EPI counted "
          f"{fused_epi.num_steps} (+{fused_epi.skipped_steps} skipped); isolated entries moved: {moved}; "
          f"max importance {top:.3g} (unfused twin: {plain_top:.3g}, {plain_epi.num_steps} steps)")
    assert skipped >= 1 and moved == 0 and plain_moved == 0
    assert (fused_epi.num_steps, fused_epi.skipped_steps) == (STEPS - skipped, skipped)
    assert plain_epi.num_steps == STEPS - plain_skipped
    assert first_ok, "the importance after the first step is not that of the unscaled gradients"
    assert 0.1 < top / plain_top < 10


def check_trainer(device):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from epi_mini.hf import EPICallback

    transformers.logging.set_verbosity_error()

    class Watch(TrainerCallback):
        """Counts isolated entries that moved, around every step the torch optimizer takes (hooks after EPI's)."""

        def __init__(self, epi):
            self.epi, self.steps, self.moved = epi, 0, 0

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            params, inner = dict(model.named_parameters()), optimizer.optimizer
            assert isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"]

            def pre(*_):
                self.before = {n: p.detach().clone() for n, p in params.items()}

            def post(*_):
                masks = self.epi.isolation.isolated
                self.moved += sum(int((p.detach() != self.before[n])[masks[n]].sum()) for n, p in params.items())
                self.steps += 1
            inner.register_step_pre_hook(pre)
            inner.register_step_post_hook(post)

    gen = torch.Generator().manual_seed(0)
    start, stride = torch.randint(0, 64, (512, 1), generator=gen), torch.randint(1, 4, (512, 1), generator=gen)
    data = [{"input_ids": ids, "labels": ids} for ids in (start + stride * torch.arange(32)) % 64]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=64,
                                       bos_token_id=None, eos_token_id=None))
    calls = []

    def overflow_once(module, args, output):
        calls.append(1)
        if len(calls) == 12:
            output["loss"] = output["loss"] * float("inf")
        return output
    model.register_forward_hook(overflow_once)
    epi = EPICallback(isolation_ratio=0.1, mask_interval=5, warmup_steps=5)
    watch = Watch(epi)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=40, per_device_train_batch_size=16, learning_rate=1e-3,
                                 fp16=True, use_cpu=device == "cpu", report_to=[], disable_tqdm=True,
                                 save_strategy="no", logging_steps=10, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[epi, watch])
        trainer.remove_callback(PrinterCallback)
        if device == "cpu":  # accelerate makes its GradScaler on a GPU only: hand it one, set up as on a GPU
            trainer.accelerator.scaler, trainer.accelerator.native_amp = torch.amp.GradScaler("cpu"), True
        assert trainer.args.optim == "adamw_torch_fused" and trainer.accelerator.scaler is not None
        trainer.train()
    isolation, steps = epi.isolation, trainer.state.global_step
    top = max(float(s.max()) for s in isolation.scores.values())
    print(f"2. Trainer, fp16, adamw_torch_fused: {steps} steps, EPI counted {isolation.num_steps} "
          f"(+{isolation.skipped_steps} skipped); isolated entries moved: {watch.moved} in {watch.steps} optimizer "
          f"steps; max importance {top:.3g}")
    assert watch.steps == steps and watch.moved == 0
    assert isolation.skipped_steps >= 1 and isolation.num_steps + isolation.skipped_steps == steps
    assert top < 1.0  # scaled by 2**16, the squared gradients would be ~4e9 times larger


def main():
    ap = OptionParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = ap.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_amp: no CUDA device here, nothing checked (run it on a machine with a GPU, or with --device cpu)")
        return 0
    check_loop(device)
    check_trainer(device)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
