"""EPI inside Hugging Face's Trainer and accelerate (epi_mini.hf, the optional extra 'hf'): exact isolation with
no optimizer proxy, fp16 with a fused AdamW, resume from a Trainer checkpoint, the logs, and the package without
transformers.
Hermetic: a tiny randomly initialised GPT-2, nothing downloaded. Run: python -m pytest tests/test_hf.py -q"""
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from epi_mini.epi import EvolvingIsolation
from epi_mini.hf import EPI_STATE_NAME, EPICallback

# Library notices that a random 64-token GPT-2 triggers and that say nothing about EPI (GPT2LMHeadModel's
# class name maps to no loss_type; on resume, lm_head.weight is "missing" because it is tied to the embedding).
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

EPI_OPTIONS = dict(isolation_ratio=0.2, mask_interval=5, warmup_steps=5)


class Progressions(torch.utils.data.Dataset):
    """Arithmetic progressions mod 64 (start and stride random): a sequence a tiny GPT-2 learns in a few steps."""

    def __init__(self, n=256, length=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        start, stride = torch.randint(0, 64, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(length)) % 64

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=None, eos_token_id=None))


def make_trainer(out, callbacks, max_steps=20, **args):
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=16,
                             learning_rate=1e-2, logging_steps=5, save_steps=10, report_to=[], disable_tqdm=True,
                             seed=0, use_cpu=True, **args)
    return Trainer(model=tiny_gpt2(), args=args, train_dataset=Progressions(), callbacks=callbacks)


class Watch(TrainerCallback):
    """Snapshots the weights around every step the torch optimizer takes, by step hooks registered after EPI's
    (so its pre-hook sees the set EPI has just chosen, and its post-hook the weights EPI has restored)."""

    def __init__(self, epi):
        self.epi, self.steps, self._hooks = epi, [], []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        params, inner = dict(model.named_parameters()), optimizer.optimizer  # accelerate's wrapper -> torch's
        assert isinstance(inner, torch.optim.AdamW)

        def pre(*_):
            self.before = {n: p.detach().clone() for n, p in params.items()}

        def post(*_):
            isolated = self.epi.isolation.isolated
            moved = {n: p.detach() != self.before[n] for n, p in params.items()}
            self.steps.append({"isolated": sum(int(m.sum()) for m in isolated.values()),
                               "isolated_moved": sum(int((moved[n] & m).sum()) for n, m in isolated.items()),
                               "others_moved": sum(int((moved[n] & ~m).sum()) for n, m in isolated.items())})
        self._hooks = [inner.register_step_pre_hook(pre), inner.register_step_post_hook(post)]

    def on_train_end(self, *args, **kwargs):
        for h in self._hooks:
            h.remove()


class Crash(TrainerCallback):
    """Stops the process's training abruptly after ``at`` steps, as a killed job would (no final save)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"simulated crash at step {self.at}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    epi = EPICallback(**EPI_OPTIONS)
    trainer = make_trainer(tmp_path_factory.mktemp("uninterrupted"), [epi])
    trainer.train()
    return epi, trainer


def test_trainer_train_with_the_callback_isolates_exactly_bf16_and_gradient_accumulation(tmp_path):
    epi = EPICallback(**EPI_OPTIONS)
    watch = Watch(epi)
    trainer = make_trainer(tmp_path, [epi, watch], max_steps=12, bf16=True, gradient_accumulation_steps=2,
                           save_strategy="no")
    trainer.train()
    steps = watch.steps
    assert len(steps) == 12 == epi.isolation.num_steps == trainer.state.global_step  # one EPI step per update
    assert all(s["isolated"] == 0 for s in steps[:5])                               # warm-up: nothing isolated
    assert all(s["isolated"] > 0.19 * sum(p.numel() for p in epi.isolation.params.values()) for s in steps[5:])
    assert all(s["isolated_moved"] == 0 for s in steps)                             # isolated: bit-identical
    assert all(s["others_moved"] > 0 for s in steps)                                # the rest trained
    assert [h["step"] for h in epi.isolation.history] == [6, 11]
    assert not epi.isolation._hooks                                                 # detached at train end


def test_a_trainer_resumed_from_a_checkpoint_reproduces_the_uninterrupted_masks(tmp_path, uninterrupted):
    reference, ref_trainer = uninterrupted
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        make_trainer(tmp_path, [EPICallback(**EPI_OPTIONS), Crash(at=13)]).train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10"]
    resumed = EPICallback(**EPI_OPTIONS)
    trainer = make_trainer(tmp_path, [resumed])
    trainer.train(resume_from_checkpoint=True)                                      # the user's one change
    assert resumed.isolation.history == reference.isolation.history                 # first isolation at 6, not 16
    assert resumed.isolation.num_steps == 20
    for name, mask in reference.isolation.isolated.items():
        assert torch.equal(resumed.isolation.isolated[name], mask), name
        assert torch.equal(resumed.isolation.scores[name], reference.isolation.scores[name]), name
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), ref_trainer.model.parameters()))


def test_resuming_without_epi_state_is_refused_instead_of_restarting_warm_up(tmp_path, uninterrupted):
    _, ref_trainer = uninterrupted
    source = Path(ref_trainer.args.output_dir) / "checkpoint-10"
    shutil.copytree(source, tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-10" / EPI_STATE_NAME).unlink()                          # a checkpoint from before EPI
    with pytest.raises(FileNotFoundError, match="resumed at step 10, but no EPI state was found"):
        make_trainer(tmp_path, [EPICallback(**EPI_OPTIONS)]).train(resume_from_checkpoint=True)
    shutil.copy(source.parent / "checkpoint-20" / EPI_STATE_NAME, tmp_path / "checkpoint-10")   # another step's
    with pytest.raises(ValueError, match="saved at step 20, but the Trainer resumed at step 10"):
        make_trainer(tmp_path, [EPICallback(**EPI_OPTIONS)]).train(resume_from_checkpoint=True)
    elsewhere = tmp_path / "copied"                                                 # a checkpoint moved elsewhere
    shutil.copytree(source, elsewhere)
    epi = EPICallback(**EPI_OPTIONS, resume_from=elsewhere)
    make_trainer(tmp_path / "out", [epi], max_steps=12).train(resume_from_checkpoint=str(elsewhere))
    assert [h["step"] for h in epi.isolation.history] == [6, 11]


def test_the_logs_and_the_checkpoints_carry_the_epi_state(uninterrupted):
    epi, trainer = uninterrupted
    lines = [line for line in trainer.state.log_history if "loss" in line]
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    assert lines[0]["epi/isolated_fraction"] == 0.0 and "epi/jaccard_previous" not in lines[0]   # warm-up
    by_step = {h["step"]: h for h in epi.isolation.history}                         # refreshes at 6, 11, 16
    for line in lines[1:]:
        assert line["epi/isolated_fraction"] == pytest.approx(0.2, abs=1e-4)
        last = by_step[max(s for s in by_step if s <= line["step"])]
        assert line.get("epi/jaccard_previous") == last["jaccard_previous"]         # None -> absent
    assert 0 < lines[-1]["epi/jaccard_previous"] < 1
    assert lines[-1]["loss"] < 0.85 * lines[0]["loss"]                               # and it learned
    saved = torch.load(Path(trainer.args.output_dir) / "checkpoint-10" / EPI_STATE_NAME, weights_only=True)
    assert saved["global_step"] == 10 and [h["step"] for h in saved["isolation"]["history"]] == [6]


def test_callback_options_are_checked_when_it_is_built():
    with pytest.raises(ValueError, match="invalid isolation_ratio=2"):
        EPICallback(isolation_ratio=2)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['isolation_raito'\]"):
        EPICallback(isolation_raito=0.1)
    with pytest.raises(TypeError, match="not both"):
        EPICallback(lambda model: EvolvingIsolation(model), warmup_steps=3)
    with pytest.raises(TypeError, match="must be an EvolvingIsolation"):
        EPICallback("epi")


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_accelerate_prepare_then_attach_masks_through_its_wrapper_and_scaler(fused):
    """accelerate makes a GradScaler only for fp16 on a GPU; here the same scaler is handed to it on CPU, so
    AcceleratedOptimizer.step runs its scaler path: unscale and skip on overflow, then step the inner optimizer;
    or, for a fused one, step it with the scaled gradients, the scale and the device flag that skips it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                                                                    fused=fused))
    epi = EvolvingIsolation(model, isolation_ratio=0.3, mask_interval=3, warmup_steps=2)
    epi.attach(optimizer)                                          # the wrapper: attached through optimizer.optimizer
    x = torch.randn(64, 8)
    y = x.flip(1)
    losses = []
    for i in range(30):
        with accelerator.autocast(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        accelerator.backward(loss)                                 # scaled by 65536
        if i == 10:
            model[0].weight.grad[0, 0] = float("inf")              # an fp16 overflow
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        after = list(model.parameters())
        if i == 10:  # (accelerate cannot tell that a fused optimizer skipped its step on the device)
            assert optimizer.step_was_skipped != fused and all(torch.equal(a, b) for a, b in zip(before, after))
        else:
            for (n, _), a, b in zip(model.named_parameters(), before, after):
                assert torch.equal(a[epi.isolated[n]], b.detach()[epi.isolated[n]]), n
        losses.append(loss.item())
    assert epi.num_steps == 29 and epi.skipped_steps == fused      # the scaler's skip: not a step for EPI
    assert max(float(s.max()) for s in epi.scores.values()) < 10.0  # the EMA saw unscaled gradients
    assert epi.isolated_fraction() == pytest.approx(0.3, abs=1e-2) and losses[-1] < 0.5 * losses[0]


def test_trainer_fp16_with_its_default_fused_adamw_skips_an_overflow_in_epi_too(tmp_path):
    """fp16 on a GPU: accelerate's GradScaler and the Trainer's default optimizer, adamw_torch_fused, which the
    scaler does not skip but hands a device flag that skips its update. Here the scaler is handed to accelerate
    on the CPU (as above), set up as on a GPU (native_amp: it unscales before clipping), with one overflow."""
    epi = EPICallback(**EPI_OPTIONS)
    watch = Watch(epi)
    trainer = make_trainer(tmp_path, [epi, watch], fp16=True, save_strategy="no")
    assert trainer.args.optim == "adamw_torch_fused"
    trainer.accelerator.scaler, trainer.accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), True
    calls = []

    def overflow_at_the_eighth_forward(module, args, output):
        calls.append(1)
        if len(calls) == 8:
            output["loss"] = output["loss"] * float("inf")
        return output
    trainer.model.register_forward_hook(overflow_at_the_eighth_forward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # EPI wraps accelerate's optimizer.step, keeping the mark that the learning-rate scheduler left on it
    assert not [w for w in caught if "overridden after learning rate scheduler" in str(w.message)]
    steps, isolation = watch.steps, epi.isolation
    assert len(steps) == 20 and trainer.accelerator.scaler.get_scale() == 2.0 ** 15   # stepped 20 times, 1 overflow
    assert [s["others_moved"] == 0 for s in steps].count(True) == 1                  # that step moved nothing
    assert all(s["isolated_moved"] == 0 for s in steps)                             # isolated: bit-identical
    assert (isolation.num_steps, isolation.skipped_steps) == (19, 1)                 # not one EPI step
    assert [h["step"] for h in isolation.history] == [6, 11, 16]
    assert max(float(s.max()) for s in isolation.scores.values()) < 1.0              # unscaled gradients


def test_the_package_runs_without_transformers_and_epi_mini_hf_says_how_to_install_it():
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        sys.modules["transformers"] = None      # as if the optional extra were not installed
        sys.modules["accelerate"] = None
        import epi_mini
        for m in pkgutil.walk_packages(epi_mini.__path__, "epi_mini."):
            if m.name != "epi_mini.hf" and not m.name.endswith("__main__"):  # __main__ would run the demo
                importlib.import_module(m.name)
        from epi_mini.config import make_config
        from epi_mini.train import train
        record = train(make_config("tiny", method="epi", schedule="multitask", tasks=("chat",), steps_per_stage=8,
                                   warmup_steps=2, mask_interval=2, eval_size=2, device="cpu"), progress=False)
        print("TRAINED", record["loss_curve"]["step"][-1], record["isolated_fraction"][-1])
        try:
            import epi_mini.hf
        except ImportError as e:
            print("HF:", e)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TRAINED 8 0.1" in out.stdout, out.stdout                               # 8 steps, 10% isolated
    hf_line = next(line for line in out.stdout.splitlines() if line.startswith("HF:"))
    assert "optional extra 'hf'" in hf_line and "pip install -e '.[hf]'" in hf_line
