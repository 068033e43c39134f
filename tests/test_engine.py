import copy
import os
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DeepSpeedConfig, OptimConfig, StageConfig
from pipeline.dist import free_port, init_process_group, read_env
from pipeline.engine import (
    BackgroundCheckpointEngine,
    build_config,
    build_engine,
    consolidated_state_dict,
    load_checkpoint,
    matmul_dtype,
    model_compile_mode,
    param_groups,
    save_checkpoint,
    skipped_steps,
    to_float8,
)
from pipeline.engine_patches import drop_persistent_gather
from pipeline.models.mixer import MixerSpec, MlpMixer

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def stage(kind="pretrain", **kw):
    return StageConfig(name=kind, kind=kind, dataset="d", steps=100, optim=OptimConfig.for_kind(kind), **kw)


def test_pretrain_uses_adamw_with_linear_warmup_decay_and_clipping():
    config = build_config(stage(micro_batch=32, grad_accum=4), DeepSpeedConfig(zero_stage=2), 8, CPU)
    assert config["train_batch_size"] == 32 * 4 * 8
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert config["optimizer"]["params"]["fused"] is True  # torch's fused AdamW, on the CPU too
    assert config["scheduler"]["type"] == "WarmupDecayLR"
    assert config["scheduler"]["params"]["warmup_type"] == "linear"
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] == 2
    assert config["bf16"]["enabled"] is False


def test_finetune_uses_cosine_and_a_client_sgd():
    config = build_config(stage("finetune"), DeepSpeedConfig(), 2, CPU)
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"] is True
    assert config["scheduler"]["type"] == "WarmupCosineLR"


def test_precision_and_zero_stage_follow_device_and_stage_override():
    config = build_config(stage(zero_stage=3), DeepSpeedConfig(zero_stage=1), 1, GPU)
    assert config["bf16"]["enabled"] is True
    assert config["optimizer"]["params"]["fused"] is True
    assert config["zero_optimization"]["stage"] == 3
    assert build_config(stage(), DeepSpeedConfig(precision="fp32"), 1, GPU)["bf16"]["enabled"] is False


def test_autocast_keeps_fp32_weights_and_bf16_matmuls_and_no_step_syncs():
    config = build_config(stage(), DeepSpeedConfig(precision="autocast"), 1, GPU)
    assert config["bf16"]["enabled"] is False
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert matmul_dtype(DeepSpeedConfig(precision="autocast"), GPU) == torch.bfloat16  # MFU's peak
    assert matmul_dtype(DeepSpeedConfig(), CPU) == torch.float32
    assert "torch_autocast" not in build_config(stage(), DeepSpeedConfig(), 1, GPU)
    # DeepSpeed's throughput timer would synchronise the device twice per step
    assert config["timers"]["throughput"]["enabled"] is False


def test_compiled_zero3_on_gpus_compiles_through_deepcompile_in_the_default_mode():
    ds = DeepSpeedConfig(zero_stage=3, compile=True)
    assert build_config(stage(), ds, 2, GPU)["compile"] == {"deepcompile": True}
    assert "compile" not in build_config(stage(), ds, 2, CPU)  # DeepSpeed has no CPU build of DeepCompile
    assert "compile" not in build_config(stage("eval"), ds, 2, GPU)  # no optimiser: the model compiles as usual
    assert "compile" not in build_config(stage(zero_stage=2), ds, 2, GPU)
    assert "compile" not in build_config(stage(), DeepSpeedConfig(zero_stage=3), 2, GPU)
    mode = "default"
    assert model_compile_mode(build_config(stage(), ds, 2, GPU), mode, "cuda") is None  # the engine compiles
    assert model_compile_mode(build_config(stage("eval"), ds, 2, GPU), mode, "cuda") is None  # eager under ZeRO-3
    assert model_compile_mode(build_config(stage(), ds, 2, CPU), mode, "cpu") == mode
    assert model_compile_mode(build_config(stage(), ds, 2, CPU), mode, "cpu", stacked=True) is None
    assert model_compile_mode(build_config(stage(zero_stage=2), ds, 2, GPU), mode, "cuda") == mode
    model = MlpMixer(MixerSpec(2, 4, 16, 8, 32, 16), num_classes=3)
    with pytest.raises(ValueError, match="DeepCompile runs torch.compile's default mode"):
        build_engine(model, stage(), build_config(stage(), ds, 1, GPU), "max-autotune-no-cudagraphs")


def test_eval_stage_has_no_optimizer():
    config = build_config(stage("eval"), DeepSpeedConfig(zero_stage=2), 2, CPU)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"] == {"stage": 0}


def test_weight_decay_skips_biases_and_norms():
    model = MlpMixer(MixerSpec(2, 4, 16, 8, 32, 16), num_classes=3)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    stacked = MlpMixer(MixerSpec(2, 4, 16, 8, 32, 16), num_classes=3, stacked=True)
    decay, no_decay = param_groups(stacked, 0.1)  # biases and norms carry a block axis here: 2-D, not decayed
    assert sum(p.numel() for p in decay["params"]) == sum(p.numel() for p in param_groups(model, 0.1)[0]["params"])
    assert {p.ndim for p in decay["params"]} == {3, 4, 2} and {p.ndim for p in no_decay["params"]} == {1, 2}


def test_background_writes_keep_the_state_as_it_was_at_save_and_reuse_their_buffers(tmp_path):
    writer = BackgroundCheckpointEngine()
    weights = torch.arange(6, dtype=torch.float32)
    state = {"module": {"w": weights}, "steps": [torch.tensor(3)], "name": "x"}
    (tmp_path / "a").mkdir()
    writer.save(state, str(tmp_path / "a" / "model.pt"))
    weights.add_(100)  # training goes on while the file is written
    assert writer.wait() == [tmp_path / "a" / "model.pt"]
    saved = torch.load(tmp_path / "a" / "model.pt")
    assert torch.equal(saved["module"]["w"], torch.arange(6, dtype=torch.float32)) and saved["name"] == "x"
    (tmp_path / "b").mkdir()
    writer.save(state, str(tmp_path / "b" / "model.pt"))  # same file name, same place: the same host buffer
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "b" / "model.pt")["module"]["w"], weights)
    assert len(writer._buffers) == 2 and writer.wait() == []


def test_fp8_converts_the_channel_mixing_mlps_only_and_stays_close_to_bf16():
    torch.manual_seed(0)
    spec = MixerSpec(2, 4, 32, 24, 64, 16)  # S = 16 tokens, D_S = 24: token mixing stays in bf16
    reference = MlpMixer(spec, num_classes=5)
    torch.nn.init.normal_(reference.head.weight, std=0.2)  # a zero head would make every logit 0
    model = copy.deepcopy(reference)
    names = to_float8(model, "tensorwise")  # emulated on the CPU
    assert names == [f"blocks.{i}.channel_mixing.dense_{k}" for i in range(2) for k in range(2)]
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints load either way
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(images).float()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        return logits.detach(), m.blocks[0].channel_mixing.dense_0.weight.grad

    ref_logits, ref_grad = run(reference)
    logits, grad = run(model)
    # e4m3 keeps 3 mantissa bits (~6% per element); sums over many products average it down
    assert 0 < (logits - ref_logits).norm() <= 0.1 * ref_logits.norm()
    assert 0 < (grad - ref_grad).norm() <= 0.15 * ref_grad.norm()


def _join_two_gloo_ranks(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    init_process_group(read_env("cpu"))


def _pretrain_stage() -> StageConfig:
    return StageConfig(
        name="pretrain", kind="pretrain", dataset="d", steps=100, micro_batch=4, optim=OptimConfig(lr=0.05)
    )


def _skip_worker(rank: int, port: int, checkpoints: Path, zero_stage: int) -> None:
    _join_two_gloo_ranks(rank, port)
    train = StageConfig(
        name="pretrain",
        kind="pretrain",
        dataset="d",
        steps=100,
        micro_batch=4,
        optim=OptimConfig(lr=0.05, warmup_steps=1, grad_clip=0.01),
    )
    config = build_config(train, DeepSpeedConfig(zero_stage=zero_stage), 2, CPU)
    spec = MixerSpec(2, 4, 16, 8, 32, 16)
    engines = []
    for on_device in (True, False):  # ours, and DeepSpeed's own host-side skip on the same start
        torch.manual_seed(0)
        model = MlpMixer(spec, num_classes=3)
        torch.nn.init.normal_(model.head.weight, std=0.5)
        if on_device:
            engine = build_engine(model, train, config)
            assert hasattr(engine, "skipped_on_device")  # it applies: ZeRO-2 or 3, fused AdamW
        else:
            groups = param_groups(model, train.optim.weight_decay)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
            assert not hasattr(engine, "skipped_on_device")
        engines.append(engine)

    def step(engine, poison: bool) -> None:
        torch.manual_seed(rank)
        loss = F.cross_entropy(engine(torch.randn(4, 3, 16, 16)), torch.randint(0, 3, (4,)))
        engine.backward(loss * float("nan") if poison else loss)  # one rank's nan reaches every rank's partition
        engine.step()

    def flat(engine) -> torch.Tensor:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
            return torch.cat([p.detach().flatten().clone() for p in params])

    start = flat(engines[0])
    for engine in engines:
        for _ in range(3):  # DeepSpeed's warm-up gives the first two steps a learning rate of 0
            step(engine, poison=False)
    ours, theirs = (flat(e) for e in engines)
    assert not torch.equal(ours, start) and torch.equal(ours, theirs)  # the same clipped step, bit for bit
    norms = [float(e.get_global_grad_norm()) for e in engines]
    assert norms[0] == norms[1] > 0.01  # the same norm, and the clip did act
    for engine in engines:
        before = flat(engine)
        step(engine, poison=rank == 0)
        assert torch.equal(flat(engine), before), "a step with a nan gradient changed the weights"
        assert skipped_steps(engine) == 1
    device_skip = engines[0]
    assert int(device_skip.skipped_on_device) == 1 and device_skip.skipped_steps == 0  # by AdamW, not DeepSpeed
    assert all(int(state["step"]) == 3 for state in device_skip.optimizer.optimizer.state.values())  # count stayed
    for engine in engines:
        before = flat(engine)
        step(engine, poison=False)
        assert not torch.equal(flat(engine), before) and skipped_steps(engine) == 1
    save_checkpoint(engines[0], checkpoints, "t", {})  # the count survives a checkpoint
    torch.manual_seed(0)
    resumed = build_engine(MlpMixer(spec, num_classes=3), train, config)
    load_checkpoint(resumed, checkpoints, "t")
    assert skipped_steps(resumed) == 1 and torch.equal(flat(resumed), flat(engines[0]))
    if zero_stage == 3:  # what DeepCompile's engine drops: the post-step gather of the persistent parameters
        persistent = resumed.optimizer.persistent_parameters
        count = len(persistent)
        assert count and not drop_persistent_gather(resumed) and len(persistent) == count  # eager ZeRO-3 needs it
        for p in resumed.module.parameters():
            p.ds_persist = False  # as DeepCompile leaves every parameter: gathered in its graph at each use
        assert drop_persistent_gather(resumed) and not resumed.optimizer.persistent_parameters
    else:
        assert not drop_persistent_gather(resumed)  # ZeRO-1/2 keep every parameter whole: nothing to gather
    # Everything is checked: leave without interpreter shutdown. ZeRO-3 leaves an all-gather on gloo's worker
    # thread, which releases its tensors when done; once the interpreter is finalising, that thread can no longer
    # take the GIL and aborts the process ("terminate called without an active exception", about one run in four).
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_skips_a_nan_gradient_step_on_the_device_as_deepspeed_does(tmp_path, zero_stage):
    """Two gloo ranks, ZeRO-2 and ZeRO-3: a clipped step equals DeepSpeed's own bit for bit, and a nan gradient on
    one rank leaves every rank's weights and Adam state unchanged and is counted (through a checkpoint too). That
    the host no longer waits for the norm can only be seen on a GPU (docs/BENCHMARKS.md)."""
    torch.multiprocessing.spawn(_skip_worker, args=(free_port(), tmp_path, zero_stage), nprocs=2)


def _stacked_worker(rank: int, port: int, checkpoints: Path) -> None:
    _join_two_gloo_ranks(rank, port)
    train = _pretrain_stage()
    config = build_config(train, DeepSpeedConfig(zero_stage=2), 2, CPU)
    spec = MixerSpec(2, 4, 16, 8, 32, 20)  # S = 25 tokens: the padded token mixing
    torch.manual_seed(0)
    start = MlpMixer(spec, num_classes=3)
    torch.nn.init.normal_(start.head.weight, std=0.5)

    def step(engine) -> torch.Tensor:
        loss = F.cross_entropy(engine(torch.randn(4, 3, 20, 20)), torch.randint(0, 3, (4,)))
        engine.backward(loss)
        engine.step()
        return loss.detach()

    saved = {}
    for stacked in (False, True):
        model = MlpMixer(spec, num_classes=3, stacked=stacked)
        model.load_state_dict(start.state_dict())
        engine = build_engine(model, train, config)
        torch.manual_seed(rank)
        for _ in range(4):  # DeepSpeed's warm-up gives the first steps a small learning rate
            step(engine)
        save_checkpoint(engine, checkpoints / str(stacked), "t", {})
        saved[stacked] = consolidated_state_dict(checkpoints / str(stacked), "t")
        resumed = build_engine(MlpMixer(spec, num_classes=3, stacked=stacked), train, config)
        load_checkpoint(resumed, checkpoints / str(stacked), "t")
        torch.manual_seed(100 + rank)
        after_resume = step(resumed)
        torch.manual_seed(100 + rank)
        assert torch.equal(after_resume, step(engine)), "the resumed engine took another step than the saved one"
    per_block, stacked = saved[False], saved[True]
    assert stacked.keys() == per_block.keys()  # the consolidated checkpoint speaks per-block names
    for name, value in per_block.items():
        assert not torch.equal(value, start.state_dict()[name]) or name.endswith("norm.weight"), name
        if name.endswith("token_mixing.dense_1.bias"):
            continue  # its true gradient is 0 (a later LayerNorm removes it): Adam turns rounding noise into steps
        torch.testing.assert_close(stacked[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_stacked_blocks_train_resume_and_consolidate_as_per_block_ones_under_zero2(tmp_path):
    """Two gloo ranks, ZeRO-2: the stacked model trains to the per-block model's weights (up to the order of
    float sums), resumes from its own checkpoint exactly, and consolidates to per-block names."""
    torch.multiprocessing.spawn(_stacked_worker, args=(free_port(), tmp_path), nprocs=2)


def _zero3_worker(rank: int, port: int, checkpoints: Path, stacked: bool) -> None:
    _join_two_gloo_ranks(rank, port)
    train = _pretrain_stage()
    spec = MixerSpec(2, 4, 16, 8, 32, 20)  # S = 25 tokens: the padded token mixing
    torch.manual_seed(0)
    start = MlpMixer(spec, num_classes=3)
    torch.nn.init.normal_(start.head.weight, std=0.5)
    saved, losses = {}, {}
    for zero in (2, 3):
        model = MlpMixer(spec, num_classes=3, stacked=stacked)
        model.load_state_dict(start.state_dict())
        if stacked and zero == 3:
            model.blocks.slicing = "select"  # as DeepCompile runs it on GPUs
        config = build_config(train, DeepSpeedConfig(zero_stage=zero), 2, CPU)
        # ZeRO-3 keeps parameters under 100k elements whole on every rank by default: partition all of them here
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        # compiled, as dynamo reads the weights (a stacked model runs eager under ZeRO-3 without DeepCompile)
        engine = build_engine(model, train, config, "default")
        torch.manual_seed(rank)
        losses[zero] = []
        for _ in range(4):
            loss = F.cross_entropy(engine(torch.randn(4, 3, 20, 20)), torch.randint(0, 3, (4,)))
            engine.backward(loss)
            engine.step()
            losses[zero].append(loss.item())
        save_checkpoint(engine, checkpoints / str(zero), "t", {})
        saved[zero] = consolidated_state_dict(checkpoints / str(zero), "t")
    torch.testing.assert_close(losses[3], losses[2], rtol=1e-5, atol=1e-6)
    for name, value in saved[2].items():
        assert not torch.equal(value, start.state_dict()[name]) or name.endswith("norm.weight"), name
        if name.endswith("token_mixing.dense_1.bias"):
            continue  # its true gradient is 0 (a later LayerNorm removes it): Adam turns rounding noise into steps
        torch.testing.assert_close(saved[3][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True])
def test_zero3_gathers_the_padded_token_mixing_weights_and_trains_as_zero2(tmp_path, stacked):
    """Two gloo ranks, compiled: ZeRO-3 partitions every weight, and the padded token mixing reads its `Linear`
    weights in the block's forward, outside their own modules. Eager DeepSpeed gathers such a weight when it is
    read; a compiled model read the empty partition instead, unless the block gathers them. Same losses and weights
    as ZeRO-2, and the same with stacked blocks, whose slices are taken one block at a time under ZeRO-3."""
    torch.multiprocessing.spawn(_zero3_worker, args=(free_port(), tmp_path, stacked), nprocs=2)
