import copy

import pytest
import torch

from pipeline.models.mixer import (
    BLOCK_PARAMETERS,
    VARIANTS,
    MixerSpec,
    MlpMixer,
    bytes_kept_for_backward,
    count_params,
    grow_resolution,
    unstack_state,
)

# Table 1 of the paper, millions of parameters without the head, at 224x224.
TABLE_1 = {"S/32": 19, "S/16": 18, "B/32": 60, "B/16": 59, "L/32": 206, "L/16": 207, "H/14": 431}
TINY = MixerSpec(num_blocks=2, patch_size=4, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32, image_size=16)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_parameter_counts_match_table_1(name, stacked):
    with torch.device("meta"):
        model = MlpMixer(VARIANTS[name], num_classes=1000, stacked=stacked)
    assert round(count_params(model) / 1e6) == TABLE_1[name]
    assert count_params(model, include_head=True) - count_params(model) == 1000 * VARIANTS[name].hidden_dim + 1000


@pytest.mark.parametrize("name", ["S/32", "B/32"])
def test_named_variant_forward_shapes(name):
    spec = MixerSpec(**{**VARIANTS[name].__dict__, "image_size": 64})
    model = MlpMixer(spec, num_classes=7)
    images = torch.randn(2, 3, 64, 64)
    assert model.features(images).shape == (2, spec.hidden_dim)
    assert model(images).shape == (2, 7)


def test_head_is_zero_initialised_so_initial_logits_are_zero():
    model = MlpMixer(TINY, num_classes=5)
    assert torch.count_nonzero(model(torch.randn(3, 3, 16, 16))) == 0


def test_token_mixing_width_follows_patch_count():
    block = MlpMixer(TINY, num_classes=2).blocks[0]
    assert block.token_mixing.dense_0.weight.shape == (TINY.tokens_mlp_dim, TINY.num_patches)
    assert block.channel_mixing.dense_0.weight.shape == (TINY.channels_mlp_dim, TINY.hidden_dim)


def test_padded_token_mixing_equals_the_plain_mlp_in_value_and_gradient():
    """S = 25 tokens run padded to 32; the result and every gradient match the unpadded MLP."""
    spec = MixerSpec(num_blocks=1, patch_size=4, hidden_dim=8, tokens_mlp_dim=6, channels_mlp_dim=16, image_size=20)
    torch.manual_seed(0)
    block = MlpMixer(spec, num_classes=2).blocks[0].double()
    assert block.token_pad == 7 and MlpMixer(TINY, num_classes=2).blocks[0].token_pad == 0  # S = 16: no padding
    for dense in (block.token_mixing.dense_0, block.token_mixing.dense_1):
        torch.nn.init.normal_(dense.bias)  # zero biases would hide a bias landing on the wrong rows
    y = torch.randn(3, 8, 25, dtype=torch.float64, requires_grad=True)
    grads = []
    for mix in (block._mix_tokens, block.token_mixing):
        out = mix(y)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float64)).view_as(out))
        grads.append([out.detach(), y.grad.clone()] + [p.grad.clone() for p in block.token_mixing.parameters()])
        block.zero_grad()
        y.grad = None
    assert grads[0][0].shape == (3, 8, 25)
    for padded, plain in zip(*grads, strict=True):
        torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)


def test_patches_are_mixed_only_through_token_mixing():
    """Zeroing the token-mixing output makes every patch's features independent of the other patches."""
    torch.manual_seed(0)
    model = MlpMixer(TINY, num_classes=2).eval()
    for block in model.blocks:
        torch.nn.init.zeros_(block.token_mixing.dense_1.weight)
        torch.nn.init.zeros_(block.token_mixing.dense_1.bias)
    a = torch.randn(1, 3, 16, 16)
    b = a.clone()
    b[..., :4, :4] = torch.randn(3, 4, 4)  # change one patch only
    tokens = lambda x: model.stem(x).flatten(2).transpose(1, 2)  # noqa: E731
    xa, xb = tokens(a), tokens(b)
    for block in model.blocks:
        xa, xb = block(xa), block(xb)
    assert torch.allclose(xa[:, 1:], xb[:, 1:])
    assert not torch.allclose(xa[:, 0], xb[:, 0])


def test_stochastic_depth_rises_linearly_and_is_off_in_eval():
    model = MlpMixer(MixerSpec(5, 4, 16, 8, 32, 16), num_classes=2, stoch_depth=0.2)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.features(x), model.features(x))


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MlpMixer(MixerSpec(2, 5, 16, 8, 32, 16), num_classes=2)


@pytest.mark.parametrize("factor", [2, 3])
def test_grown_model_mixes_each_tile_exactly_as_the_source_mixed_the_whole_image(factor):
    """App. C's defining property: on an image of K x K tiles, every tile's tokens after every block equal the
    source model's tokens on that tile alone."""
    torch.manual_seed(0)
    spec = MixerSpec(num_blocks=3, patch_size=4, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32, image_size=12)
    source = MlpMixer(spec, num_classes=3).eval()
    for p in source.parameters():  # non-trivial biases too, not only the initialiser's zeros
        torch.nn.init.normal_(p, std=0.3)
    state, grown_spec = grow_resolution(source.state_dict(), spec, factor)
    assert grown_spec == spec.grown(factor)
    assert (grown_spec.image_size, grown_spec.num_patches, grown_spec.tokens_mlp_dim) == (
        12 * factor,
        spec.num_patches * factor**2,
        8 * factor**2,
    )
    grown = MlpMixer(grown_spec, num_classes=3).eval()
    grown.load_state_dict(state)

    image = torch.randn(2, 3, 12 * factor, 12 * factor)

    def tokens_per_block(model, x):
        x = model.stem(x).flatten(2).transpose(1, 2)
        out = []
        for block in model.blocks:
            x = block(x)
            out.append(x)
        return out

    big = tokens_per_block(grown, image)
    side, big_side = 3, 3 * factor  # tokens per side
    with torch.no_grad():
        for ti in range(factor):
            for tj in range(factor):
                tile = image[..., ti * 12 : (ti + 1) * 12, tj * 12 : (tj + 1) * 12]
                small = tokens_per_block(source, tile)
                rows = torch.arange(side).repeat_interleave(side) + ti * side
                cols = torch.arange(side).repeat(side) + tj * side
                where = rows * big_side + cols
                for layer, (b, s) in enumerate(zip(big, small)):
                    assert torch.allclose(b[:, where], s, atol=1e-5), (ti, tj, layer)


def test_grown_token_mixing_is_block_diagonal():
    spec = MixerSpec(num_blocks=1, patch_size=4, hidden_dim=8, tokens_mlp_dim=4, channels_mlp_dim=16, image_size=8)
    state, _ = grow_resolution(MlpMixer(spec, 2).state_dict(), spec, 2)
    w0 = state["blocks.0.token_mixing.dense_0.weight"]  # (K^2 D_S, K^2 S) = (16, 16)
    # Four sub-grids, each a (D_S=4) x (S=4) block; every other weight is zero.
    assert w0.shape == (16, 16) and torch.count_nonzero(w0) == 4 * 4 * 4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "stacked", "remat"),
    [
        ("default", False, "none"),
        ("max-autotune-no-cudagraphs", False, "none"),
        ("default", True, "none"),
        ("default", False, "matmuls"),
        ("default", True, "blocks"),
    ],
)
def test_compiled_bf16_autocast_model_matches_eager_fp32_logits_and_gradients(mode, stacked, remat):
    """The fast path (`deepspeed.compile`, `precision: autocast`) against the plain eager fp32 model: the same
    logits and gradients up to bf16 rounding (its 8-bit mantissa gives ~0.4% per product), also with the blocks
    recomputed in the backward pass (`model.remat`)."""
    torch.manual_seed(0)
    spec = MixerSpec(2, 4, 32, 16, 64, 16)
    eager = MlpMixer(spec, num_classes=5)
    torch.nn.init.normal_(eager.head.weight, std=0.2)  # a zero head would make every logit and most gradients 0
    fast = MlpMixer(spec, num_classes=5, stacked=stacked, remat=remat)
    fast.load_state_dict(eager.state_dict())
    fast.compile(mode=mode)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))

    def run(model, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(images).float()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        return logits.detach(), unstack_state({n: p.grad for n, p in model.named_parameters()})

    ref_logits, ref_grads = run(eager, autocast=False)
    eager.zero_grad()
    bf16_logits, bf16_grads = run(eager, autocast=True)  # the same bf16 rounding, uncompiled: the noise floor
    logits, grads = run(fast, autocast=True)
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= max(0.02 * scale, 2 * (bf16_logits - ref_logits).abs().max())
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        err, noise = (grads[name] - grad).norm(), (bf16_grads[name] - grad).norm()
        # within 3% of the gradient, or no further off than eager bf16 (token-mixing output biases shift a token's
        # channels alike, which every later LayerNorm removes: their true gradient is 0, only noise is left)
        assert err <= max(0.03 * grad.norm(), 2 * noise), f"{name}: error {err:.3g}, eager bf16 {noise:.3g}"


def _stacked_and_per_block_pair(spec: MixerSpec, **kw) -> tuple[MlpMixer, MlpMixer]:
    """A per-block model with every parameter random (zero biases and head would hide misplaced ones), and the
    stacked model loaded from its state dict."""
    torch.manual_seed(0)
    per_block = MlpMixer(spec, num_classes=5, **kw)
    for p in per_block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    stacked = MlpMixer(spec, num_classes=5, stacked=True, **kw)
    stacked.load_state_dict(per_block.state_dict())
    return per_block, stacked


def test_stacked_blocks_hold_one_tensor_per_block_parameter_and_speak_per_block_names():
    spec = MixerSpec(num_blocks=3, patch_size=4, hidden_dim=8, tokens_mlp_dim=6, channels_mlp_dim=16, image_size=20)
    per_block, stacked = _stacked_and_per_block_pair(spec)
    names = [n for n, _ in stacked.named_parameters()]
    assert [n for n in names if n.startswith("blocks.")] == [f"blocks.{n}" for n in BLOCK_PARAMETERS]
    assert stacked.get_parameter("blocks.token_mixing.dense_0.weight").shape == (3, 6, 25)
    assert len(list(per_block.parameters())) == len(names) + 12 * 2
    state, expected = stacked.state_dict(), per_block.state_dict()
    assert list(state) == list(expected)  # the weight files' names and order, both ways
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in state.values())  # no views
    back = MlpMixer(spec, num_classes=5)
    back.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), per_block.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="Missing key"):  # a block short: refused, not half-stacked
        MlpMixer(spec, num_classes=5, stacked=True).load_state_dict(
            {k: v for k, v in expected.items() if ".2." not in k}
        )


def test_stacked_model_is_the_same_function_with_the_same_gradients():
    """Stacking changes where the weights live, not the arithmetic: logits (stochastic depth on, same seed) and
    every gradient match the per-block model bit for bit, whether the blocks' slices are taken all at once (`unbind`)
    or block by block (`select`, as under DeepCompile)."""
    spec = MixerSpec(num_blocks=3, patch_size=4, hidden_dim=8, tokens_mlp_dim=6, channels_mlp_dim=16, image_size=20)
    per_block, stacked = _stacked_and_per_block_pair(spec, stoch_depth=0.5)
    selecting = copy.deepcopy(stacked)
    selecting.blocks.slicing = "select"
    images = torch.randn(6, 3, 20, 20)
    results = []
    for model in (per_block, stacked, selecting):
        torch.manual_seed(1)
        logits = model(images)
        logits.square().sum().backward()
        grads = unstack_state({n: p.grad for n, p in model.named_parameters()})
        results.append((logits.detach(), grads))
    (ref_logits, ref_grads), *others = results
    for logits, grads in others:
        assert torch.equal(logits, ref_logits)
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            assert torch.equal(grads[name], grad), name
    model = per_block.eval()  # and stochastic depth is off in eval for both
    assert torch.equal(model(images), stacked.eval()(images))


def test_unstack_state_splits_only_stacked_keys():
    spec = MixerSpec(num_blocks=2, patch_size=4, hidden_dim=8, tokens_mlp_dim=6, channels_mlp_dim=16, image_size=16)
    per_block, stacked = _stacked_and_per_block_pair(spec)
    raw = {n: p.detach() for n, p in stacked.named_parameters()}  # as ZeRO's consolidation names them
    out = unstack_state(raw)
    assert list(out) == list(per_block.state_dict())  # the stacked entries split in place, block by block
    assert all(torch.equal(out[k], v) for k, v in per_block.state_dict().items())
    assert unstack_state(per_block.state_dict()).keys() == per_block.state_dict().keys()  # per-block: unchanged


@pytest.mark.parametrize("stacked", [False, True])
def test_remat_keeps_less_for_the_backward_pass_and_changes_no_number(stacked):
    """Recomputed blocks give the same logits and gradients, with stochastic depth's draws replayed as they were;
    "matmuls" keeps less than nothing recomputed, "blocks" less again."""
    spec = MixerSpec(num_blocks=3, patch_size=4, hidden_dim=16, tokens_mlp_dim=12, channels_mlp_dim=32, image_size=20)
    torch.manual_seed(0)
    reference = MlpMixer(spec, num_classes=5, stoch_depth=0.5, stacked=stacked)
    torch.nn.init.normal_(reference.head.weight)
    images = torch.randn(6, 3, 20, 20, requires_grad=True)
    results, saved = {}, {}
    for remat in ("none", "matmuls", "blocks"):
        model = MlpMixer(spec, num_classes=5, stoch_depth=0.5, stacked=stacked, remat=remat)
        model.load_state_dict(reference.state_dict())
        torch.manual_seed(1)
        logits = model(images)
        logits.square().sum().backward()
        results[remat] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
        saved[remat] = bytes_kept_for_backward(model, images)
        assert torch.equal(model.eval()(images), reference.eval()(images))  # evaluation: no recomputation
    ref_logits, ref_grads = results["none"]
    for remat in ("matmuls", "blocks"):
        logits, grads = results[remat]
        assert torch.equal(logits, ref_logits), remat
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=f"{remat}: {name}")
    assert saved["blocks"] < saved["matmuls"] < saved["none"], saved


def test_unknown_remat_is_refused():
    with pytest.raises(ValueError, match="remat is 'all'"):
        MlpMixer(TINY, num_classes=3, remat="all")


@pytest.mark.parametrize("stacked", [False, True])
def test_fused_gelu_runs_the_plain_path_off_the_gpu(stacked):
    """`model.fused_gelu` changes kernels on GPUs only (tests/gpu/test_fused.py compares them there); on the CPU it
    is the tanh-GELU model, number for number."""
    torch.manual_seed(0)
    plain = MlpMixer(TINY, num_classes=3, gelu="tanh", stacked=stacked)
    torch.nn.init.normal_(plain.head.weight)  # the zero head would make any two models agree
    fused = MlpMixer(TINY, num_classes=3, gelu="tanh", stacked=stacked, fused_gelu=True)
    fused.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, TINY.image_size, TINY.image_size)
    torch.testing.assert_close(fused(images), plain(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fused_gelu needs the tanh GELU"):
        MlpMixer(TINY, num_classes=3, fused_gelu=True)
