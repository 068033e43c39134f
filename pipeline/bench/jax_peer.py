"""The JAX/Flax peer of `mixer bench train`: the Mixer as the paper's authors train it (google-research's
vision_transformer and big_vision: Flax linen, bf16 compute over fp32 parameters, optax AdamW with global-norm
clipping, one jitted step), on the same shape, GELU, batch and synthetic input as the PyTorch variants.

`python -m pipeline.bench.jax_peer --model B/16 --batch 256 --steps 30 --warmup 10 --gelu exact` prints one JSON
line: images/s, ms per step and peak device memory. `mixer bench train` runs it as a subprocess (variant
`jax/flax`), so the two frameworks never share a process or a GPU memory pool; jax, flax and optax are the `bench`
extra, not runtime dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def run(model: str, batch: int, steps: int, warmup: int, gelu: str, num_classes: int = 1000) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # report the memory the step needs, not 75%
    import flax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from pipeline.models.mixer import LAYER_NORM_EPS, VARIANTS

    spec = VARIANTS[model]
    dense = {"dtype": jnp.bfloat16, "param_dtype": jnp.float32}
    norm = {**dense, "epsilon": LAYER_NORM_EPS}

    class MlpBlock(nn.Module):
        mlp_dim: int

        @nn.compact
        def __call__(self, x):
            y = nn.Dense(self.mlp_dim, **dense)(x)
            y = nn.gelu(y, approximate=gelu == "tanh")
            return nn.Dense(x.shape[-1], **dense)(y)

    class MixerBlock(nn.Module):
        @nn.compact
        def __call__(self, x):  # (B, S, C)
            y = jnp.swapaxes(nn.LayerNorm(**norm)(x), 1, 2)
            x = x + jnp.swapaxes(MlpBlock(spec.tokens_mlp_dim, name="token_mixing")(y), 1, 2)
            return x + MlpBlock(spec.channels_mlp_dim, name="channel_mixing")(nn.LayerNorm(**norm)(x))

    class Mixer(nn.Module):
        @nn.compact
        def __call__(self, images):  # (B, H, W, 3)
            p = spec.patch_size
            x = nn.Conv(spec.hidden_dim, (p, p), strides=(p, p), padding="VALID", name="stem", **dense)(images)
            x = x.reshape(x.shape[0], -1, spec.hidden_dim)
            for _ in range(spec.num_blocks):
                x = MixerBlock()(x)
            x = nn.LayerNorm(name="pre_head_layer_norm", **norm)(x).mean(axis=1)
            return nn.Dense(num_classes, kernel_init=nn.initializers.zeros, name="head", **dense)(x)

    net = Mixer()
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (batch, spec.image_size, spec.image_size, 3), jnp.float32)
    labels = jax.random.randint(key, (batch,), 0, num_classes)
    params = jax.jit(net.init)(key, images)["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits = net.apply({"params": p}, x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))  # parameters and moments updated in place
    for _ in range(warmup):
        params, opt_state, loss = step(params, opt_state, images, labels)
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, images, labels)
    loss.block_until_ready()
    seconds = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "images_per_s": batch * steps / seconds,
        "step_ms": seconds / steps * 1000,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "loss": float(loss),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "device": jax.devices()[0].device_kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="B/16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--gelu", choices=["exact", "tanh"], default="exact")
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.batch, args.steps, args.warmup, args.gelu)), flush=True)


if __name__ == "__main__":
    main()
