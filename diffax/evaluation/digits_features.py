"""The digits feature network: a small CNN classifier of the 16x16 digits whose penultimate layer is the
feature space of the digits FID (`diffax.evaluation.fid.digits_fid`).

    python -m diffax.evaluation.digits_features --train     # retrain and rewrite the shipped weights

Inception-v3 features mean nothing on 16x16 grey digits, so the digits recipes are measured in the features
of a network that knows digits. It is trained here on 80% of scikit-learn's 1797 digits (a fixed split,
seed 0) with one-pixel random shifts, and its weights ship inside the package
(`digits_features.safetensors`, ~360 kB), so a fresh install needs no training. The file's metadata
records the held-out accuracy on the other 20%, which `--train` prints. Images of any square size are
resized to 16x16 first (`prepare`), so 32x32 digits are measured in the same space.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.layers import Conv, Dense

IMAGE_SIZE = 16
NUM_FEATURES = 64
WEIGHTS_PATH = Path(__file__).with_name("digits_features.safetensors")
_HELD_OUT_FRACTION = 0.2


class DigitsFeatureNet(nn.Module):
    """Three 3x3 convolutions with average pooling, a 64-d ReLU feature layer and a 10-way linear head."""
    num_features: int = NUM_FEATURES

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:  # [N, 16, 16, 1] in [-1, 1]
        """(features [N, num_features], logits [N, 10])."""
        x = nn.relu(Conv(16, (3, 3), name="conv1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))  # [N, 8, 8, 16]
        x = nn.relu(Conv(32, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))  # [N, 4, 4, 32]
        x = nn.relu(Conv(64, (3, 3), name="conv3")(x))  # [N, 4, 4, 64]
        features = nn.relu(Dense(self.num_features, name="fc")(x.reshape(x.shape[0], -1)))
        return features, Dense(10, name="head")(features)


def prepare(images: np.ndarray | jax.Array) -> jax.Array:
    """[N, S, S, C] images, uint8 0..255 or float in [-1, 1], C 1 or 3 -> float32 [N, 16, 16, 1] in [-1, 1].

    RGB is averaged to grey (the RGB digits repeat the grey value); other sizes are resized with
    antialiased bilinear interpolation.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise ValueError(f"digits features: images must be [N, S, S, 1 or 3], got shape {images.shape}")
    x = jnp.asarray(images)
    x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    x = jnp.mean(x, axis=-1, keepdims=True)
    if x.shape[1] != IMAGE_SIZE:
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), method="linear", antialias=True)
    return x


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


@functools.lru_cache(maxsize=1)
def load_params(path: str | Path = WEIGHTS_PATH) -> tuple[dict[str, Any], dict[str, str]]:
    """(params, metadata) of a weights file written by `--train` (cached)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no digits feature weights; make them with "
                                f"`python -m diffax.evaluation.digits_features --train`")
    with safe_open(str(path), framework="numpy") as f:
        flat = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    return _unflatten(flat), metadata


@jax.jit
def _apply(params: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return DigitsFeatureNet().apply({"params": params}, prepare(images))


def digits_features(images: np.ndarray | jax.Array, *, batch_size: int = 512) -> np.ndarray | jax.Array:
    """The 64-d digits features [N, 64] float32 of images [N, S, S, C] (uint8, or float in [-1, 1]).

    A numpy input is run in batches of `batch_size` and gives numpy; a jax.Array (sharded over the batch,
    say) is run in one call and gives a jax.Array laid out by the batch the same way.
    """
    params, _ = load_params()
    if isinstance(images, jax.Array):
        return _apply(params, images)[0]
    images = np.asarray(images)
    prepare(images[:1])  # checks the shape before any batch runs
    return np.concatenate([np.asarray(_apply(params, images[i:i + batch_size])[0])
                           for i in range(0, len(images), batch_size)] or [np.zeros((0, NUM_FEATURES), np.float32)])


def digits_logits(images: np.ndarray | jax.Array) -> np.ndarray:
    """Class logits [N, 10] of the same network (its accuracy is the check on the features)."""
    params, _ = load_params()
    return np.asarray(_apply(params, images)[1])


def heldout_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of the fixed split the shipped weights were trained on."""
    order = np.random.default_rng(0).permutation(n)
    n_held = int(round(n * _HELD_OUT_FRACTION))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # [B, 16, 16, 1], background -1
    """Each image moved by -1, 0 or +1 pixels along each axis, so features do not hinge on exact position."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    dy, dx = rng.integers(0, 3, (2, len(images)))
    return np.stack([p[y:y + IMAGE_SIZE, x:x + IMAGE_SIZE] for p, y, x in zip(padded, dy, dx)])


def train(*, epochs: int = 60, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0
          ) -> tuple[dict[str, Any], float]:
    """Trains the network on the training split; returns (params, held-out accuracy)."""
    import optax

    from diffax.data.digits import load_digits_arrays
    images, labels = load_digits_arrays(IMAGE_SIZE, 1)
    x = np.asarray(prepare(images))  # [1797, 16, 16, 1]
    train_idx, held_idx = heldout_split(len(labels))
    model = DigitsFeatureNet()
    params = model.init(jax.random.key(seed), x[:1])["params"]
    steps_per_epoch = len(train_idx) // batch_size
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch), weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb)[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(train_idx)
        for i in range(steps_per_epoch):
            batch = order[i * batch_size:(i + 1) * batch_size]
            params, opt_state, _ = step(params, opt_state, _shift(x[batch], rng), labels[batch])
    logits = model.apply({"params": params}, x[held_idx])[1]
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[held_idx]))
    return jax.tree.map(np.asarray, params), accuracy


def save_params(path: str | Path, params: dict[str, Any], metadata: dict[str, str]) -> None:
    """Writes `params` as a safetensors file keyed by '/'-joined paths ('conv1/kernel')."""
    from safetensors.numpy import save_file
    flat = {"/".join(str(k.key) for k in path_): np.ascontiguousarray(v, np.float32)
            for path_, v in jax.tree_util.tree_leaves_with_path(params)}
    save_file(flat, str(path), metadata=metadata)


def main() -> None:
    """`--train`: train, report the held-out accuracy and write the weights; otherwise print what ships."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="train and write the weights")
    parser.add_argument("--out", default=str(WEIGHTS_PATH), help="where --train writes the weights")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    if args.train:
        start = time.perf_counter()
        params, accuracy = train(epochs=args.epochs)
        metadata = {"heldout_accuracy": f"{accuracy:.4f}", "image_size": str(IMAGE_SIZE),
                    "num_features": str(NUM_FEATURES), "epochs": str(args.epochs),
                    "held_out_fraction": str(_HELD_OUT_FRACTION)}
        save_params(args.out, params, metadata)
        print(f"trained in {time.perf_counter() - start:.0f} s: held-out accuracy {accuracy:.1%}, wrote {args.out}")
    else:
        _, metadata = load_params()
        print(json.dumps(metadata, indent=1))


if __name__ == "__main__":
    main()
