"""PixelCNN++ (Salimans et al. 2017): the two shifted streams, skips and resolutions."""

from __future__ import annotations

import dataclasses
import hashlib
import threading

import gin
import keras
import numpy as np
import tensorflow as tf

from pixelcnn import checks, internals, likelihood
from pixelcnn.layers import (
    GatedResnet,
    WeightNormConv2D,
    WeightNormConv2DTranspose,
    down_shift,
    right_shift,
)


class Programs:
    """A model's compiled programs (samplers, coders), each built on first use.

    Every ``PixelCNNPP`` holds one (``model.programs``), so the programs live as long as
    the model and a second call with the same model and batch size reuses its trace.
    Building is locked: threads sharing a model build each program once.
    """

    def __init__(self):
        self._built = {}
        self._lock = threading.RLock()  # a program may build another one it uses

    def get(self, key, build):
        """The program stored under ``key``, built by ``build()`` the first time."""
        with self._lock:
            if key not in self._built:
                self._built[key] = build()
            return self._built[key]


def weights_fingerprint(model: keras.Model) -> str:
    """SHA-256 of a model's variables (names, shapes, dtypes and bytes): which weights
    a compressed file or a fitted detector belongs to."""
    digest = hashlib.sha256()
    for v in sorted(model.weights, key=lambda v: v.path):
        arr = np.ascontiguousarray(v.numpy())
        digest.update(f"{v.path}:{arr.dtype.str}:{arr.shape}\n".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def downsampled_sizes(height: int, width: int, resolutions: int) -> list[tuple[int, int]]:
    """(H, W) at each resolution; every stride-2 conv rounds up, so odd sizes work."""
    sizes = [(height, width)]
    for _ in range(resolutions - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a PixelCNNPP: what model.json holds, what rebuilds it.

    ``PixelCNNPP(**config.to_json())`` builds the network; the constructor arguments
    that are not here (``recompute_activations``, ``dtype``) change how it computes,
    not what it computes. Validated on construction (ValueError with the fix).
    """

    image_shape: tuple[int, int, int]
    residual_blocks: int = 3
    residual_layers_per_block: int = 5
    filters: int = 160
    num_mixtures: int = 10
    dropout_rate: float = 0.5
    num_classes: int | None = None
    num_bits: int = 8

    def __post_init__(self):
        image_shape, dropout_rate = checks.check_architecture(self)
        object.__setattr__(self, "image_shape", image_shape)
        object.__setattr__(self, "dropout_rate", dropout_rate)

    def to_json(self) -> dict:
        """The fields as JSON values (image_shape a list)."""
        return dataclasses.asdict(self) | {"image_shape": list(self.image_shape)}

    @classmethod
    def from_json(cls, fields: dict) -> ModelConfig:
        """From ``to_json``'s dict (model.json's other keys ignored, missing ones default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})


def _resnets(stream, half, r, count, has_aux, first_index, args):
    """``count`` gated resnets of one stream ("u": down-shifted, "ul": down-right) at
    resolution r, named ``{half}_{stream}_{r}_{i}``; their dropout indices follow on."""
    filters, num_classes, dropout_rate, recompute, policy = args
    shift = "down" if stream == "u" else "down_right"
    return [
        GatedResnet(
            filters,
            shift,
            has_aux,
            num_classes,
            dropout_rate,
            recompute,
            index=first_index + i,
            dtype=policy,
            name=f"{half}_{stream}_{r}_{i}",
        )
        for i in range(count)
    ]


def _levels(levels: int, nr: int, sizes, resnet_args) -> tuple[list, list]:
    """The first half ("up pass" in the authors' code), full resolution first; then the
    second half ("down pass") from the lowest resolution back up, with nr resnets at
    the lowest resolution and nr + 1 at the others, so every pushed tensor is consumed.
    Each level's dropout masks are numbered after the previous level's."""
    up, down, index = [], [], 0
    for r in range(levels):
        up.append(UpLevel(r, nr, r + 1 < levels, index, resnet_args))
        index += 2 * nr
    for r in reversed(range(levels)):
        n = nr if r == levels - 1 else nr + 1
        target = sizes[r - 1] if r > 0 else None
        down.append(DownLevel(r, n, target, index, resnet_args))
        index += 2 * n
    return up, down


class _Level(keras.layers.Layer):
    """One resolution of one half of the network: ``count`` gated resnets on each
    stream (``u``, ``ul``) and the pair of stride-2 convs that leave it (``resampling``).

    The levels run through ``forward``, not Keras' ``__call__``, so no name scope of
    their own enters the variables' paths (codec files name the weights by them).
    """

    def __init__(self, half, resolution, count, u_has_aux, first_index, resnet_args):
        super().__init__(name=f"{half}_{resolution}", dtype=resnet_args[-1])
        r = self.resolution = resolution
        self.u = _resnets("u", half, r, count, u_has_aux, first_index, resnet_args)
        self.ul = _resnets("ul", half, r, count, True, first_index + count, resnet_args)
        self.built = True  # no variables of its own

    def resampling(self) -> tuple:
        raise NotImplementedError

    def parts(self) -> list:
        """The level's resnets and convs, in the order their variables were created."""
        return [*self.u, *self.ul, *[c for c in self.resampling() if c is not None]]


class UpLevel(_Level):
    """A resolution of the first half ("up pass"): the ul resnet reads the new u as its
    auxiliary input; then, unless this is the lowest resolution, a stride-2 conv of each
    stream (``halve_u``, ``halve_ul``). ``forward`` returns every (u, ul) it produces:
    the skips the second half reads.
    """

    def __init__(self, resolution, count, halve, first_index, resnet_args):
        super().__init__("up", resolution, count, False, first_index, resnet_args)
        filters, policy, r = resnet_args[0], resnet_args[-1], resolution
        self.halve_u = self.halve_ul = None
        if halve:
            self.halve_u = WeightNormConv2D(
                filters, (2, 3), "down", 2, dtype=policy, name=f"halve_u_{r}"
            )
            self.halve_ul = WeightNormConv2D(
                filters, (2, 2), "down_right", 2, dtype=policy, name=f"halve_ul_{r}"
            )

    def resampling(self) -> tuple:
        return self.halve_u, self.halve_ul

    def forward(self, u, ul, h=None, training=False, init=False, seed=None):
        """u, ul: [B, Hr, Wr, F] -> [(u, ul)] after each resnet pair, then halved."""
        run = dict(h=h, training=training, init=init, seed=seed)
        outputs = []
        for u_block, ul_block in zip(self.u, self.ul, strict=True):
            u = u_block(u, **run)
            ul = ul_block(ul, a=u, **run)
            outputs.append((u, ul))
        if self.halve_u is not None:
            outputs.append((self.halve_u(u, init=init), self.halve_ul(ul, init=init)))
        return outputs


class DownLevel(_Level):
    """A resolution of the second half ("down pass"): the resnets' auxiliary inputs are
    the first half's outputs at this resolution, last pushed first (u reads the u skip,
    ul reads concat(u, ul skip)); then, unless this is the full resolution, a stride-2
    transposed conv of each stream (``double_u``, ``double_ul``) up to ``target_hw``,
    the next resolution's size.
    """

    def __init__(self, resolution, count, target_hw, first_index, resnet_args):
        super().__init__("down", resolution, count, True, first_index, resnet_args)
        filters, policy, r = resnet_args[0], resnet_args[-1], resolution
        self.target_hw = target_hw
        self.double_u = self.double_ul = None
        if target_hw is not None:
            self.double_u = WeightNormConv2DTranspose(
                filters, (2, 3), "down", dtype=policy, name=f"double_u_{r}"
            )
            self.double_ul = WeightNormConv2DTranspose(
                filters, (2, 2), "down_right", dtype=policy, name=f"double_ul_{r}"
            )

    def resampling(self) -> tuple:
        return self.double_u, self.double_ul

    def forward(self, u, ul, skips, h=None, training=False, init=False, seed=None):
        """u, ul: [B, Hr, Wr, F]; skips: [(u, ul)], one per resnet pair, in the order
        they are read. Returns (u, ul) at the next resolution (this one's at r = 0)."""
        run = dict(h=h, training=training, init=init, seed=seed)
        for (skip_u, skip_ul), u_block, ul_block in zip(skips, self.u, self.ul, strict=True):
            u = u_block(u, a=skip_u, **run)
            ul = ul_block(ul, a=tf.concat([u, skip_ul], axis=-1), **run)
        if self.double_u is not None:
            u = self.double_u(u, target_hw=self.target_hw, init=init)
            ul = self.double_ul(ul, target_hw=self.target_hw, init=init)
        return u, ul


@keras.saving.register_keras_serializable(package="pixelcnn")
@gin.configurable
class PixelCNNPP(keras.Model):
    """PixelCNN++ over images of shape ``image_shape = (H, W, C)``.

    The network follows the authors' ``model_spec`` (openai/pixel-cnn): the input gets a
    channel of ones, the "u" stream sees the rows above and the "ul" stream the rows above
    plus the pixels to the left; the first half runs ``residual_layers_per_block`` gated
    resnets at each of ``residual_blocks`` resolutions and pushes every output on a stack,
    the second half pops them as skip inputs. Stride-2 convs round sizes up and the
    transposed convs crop back, so any H, W >= 1 works with any number of resolutions.

    Args:
      image_shape: (H, W, C), any H, W >= 1 and C >= 1. Required; ``train`` passes the
        shape of its dataset's images when gin does not bind it.
      residual_blocks: number of resolutions (3 in the paper), >= 1.
      residual_layers_per_block: gated resnets per resolution (nr_resnet, 5 in the paper).
      filters: channels of both streams (160 in the paper).
      num_mixtures: logistic mixture components (10 in the paper).
      dropout_rate: dropout inside the gated resnets during training.
      num_classes: if set, the model is class-conditional: the one-hot label enters
        every gated resnet.
      num_bits: bits per sub-pixel (8 for ordinary images).
      recompute_activations: keep each gated resnet's convolution inputs before their
        concat_elu (half the size) and recompute the concat_elu in the backward pass.
        Results are the same either way: less memory for a little more time in float32,
        and more time in bfloat16, whose elementwise ops are slow on CPUs (figures in
        benchmarks/README.md). None (the default) turns it on for float32 and off for
        bfloat16 computation.

    Calling ``model(images, labels=None, training=False)`` on float32 [B, H, W, C] in
    [-1, 1] returns the raw mixture parameters [B, H, W, P] in float32, P =
    ``num_params``; see ``pixelcnn.likelihood.unpack_params`` for their layout.
    """

    def __init__(
        self,
        image_shape=None,
        residual_blocks: int = 3,
        residual_layers_per_block: int = 5,
        filters: int = 160,
        num_mixtures: int = 10,
        dropout_rate: float = 0.5,
        num_classes: int | None = None,
        num_bits: int = 8,
        recompute_activations: bool | None = None,
        name: str = "pixelcnnpp",
        dtype=None,
    ):
        # No **kwargs: gin must be able to reject a misspelt binding.
        super().__init__(name=name, dtype=dtype)
        self.config = config = ModelConfig(
            image_shape,
            residual_blocks,
            residual_layers_per_block,
            filters,
            num_mixtures,
            dropout_rate,
            num_classes,
            num_bits,
        )
        image_shape = config.image_shape
        if recompute_activations is None:
            recompute_activations = self.compute_dtype == "float32"
        self.recompute_activations = bool(recompute_activations)
        self.num_channels = image_shape[-1]
        self.num_params = likelihood.num_params(self.num_channels, num_mixtures)
        self.sizes = downsampled_sizes(image_shape[0], image_shape[1], residual_blocks)

        policy = self.dtype_policy  # e.g. "mixed_bfloat16": every sublayer computes in it
        resnet_args = (filters, num_classes, dropout_rate, self.recompute_activations, policy)

        # First layers: u = down_shift(conv[2,3](x)); ul = down_shift(conv[1,3](x)) +
        # right_shift(down_right_conv[2,1](x)).
        self.first_u = WeightNormConv2D(filters, (2, 3), "down", dtype=policy, name="first_u")
        self.first_ul_above = WeightNormConv2D(
            filters, (1, 3), "down", dtype=policy, name="first_ul_above"
        )
        self.first_ul_left = WeightNormConv2D(
            filters, (2, 1), "down_right", dtype=policy, name="first_ul_left"
        )
        self.up, self.down = _levels(
            residual_blocks, residual_layers_per_block, self.sizes, resnet_args
        )

        # The output layer always computes in float32: bfloat16 keeps 8 significant bits,
        # so means near 1 would be quantised to half a bin of the 8-bit grid.
        self.out_nin = WeightNormConv2D(self.num_params, dtype="float32", name="out_nin")
        self.programs = Programs()  # compiled samplers and coders, built on first use

    def level(self, half: str, resolution: int) -> UpLevel | DownLevel:
        """The level of the first ("up") or second ("down") half at a resolution (0: full)."""
        levels = self.up if half == "up" else self.down[::-1]
        return levels[resolution]

    def layers_by_name(self) -> dict[str, keras.layers.Layer]:
        """Every convolution and gated resnet of the network by its unique name
        (first_u, up_ul_0_1, halve_u_0, down_u_2_0, double_ul_1, out_nin, ...), in the
        order their variables were created."""
        parts = [self.first_u, self.first_ul_above, self.first_ul_left]
        for level in (*self.up, *self.down):
            parts += level.parts()
        parts.append(self.out_nin)
        return {layer.name: layer for layer in parts}

    def convolutions(self) -> list:
        """Every weight-normalised convolution, the gated resnets' included."""
        convs = []
        for layer in self.layers_by_name().values():
            convs += layer.convolutions() if isinstance(layer, GatedResnet) else [layer]
        return convs

    def checkpointable(self) -> tf.Module:
        """The network as ``tf.train.Checkpoint`` sees it: a module whose attributes are
        ``layers_by_name()``.

        TensorFlow's object graph does not follow Keras 3's lists of layers, so a
        checkpoint of the model itself would miss the levels. These names are also
        the ones checkpoints have used since before the levels existed (every layer
        was then an attribute of the model), so those checkpoints keep loading.
        """
        view = tf.Module(name=self.name)
        for name, layer in self.layers_by_name().items():
            setattr(view, name, layer)
        return view

    # ------------------------------------------------------------------ forward pass
    def one_hot(self, labels):
        """[B] int labels -> [B, num_classes] float, or None for unconditional models."""
        if self.num_classes is None:
            return None
        if labels is None:
            raise ValueError(
                f"this model is class-conditional (num_classes={self.num_classes}): pass labels"
            )
        return tf.one_hot(tf.cast(labels, tf.int32), self.num_classes, dtype=self.compute_dtype)

    def call(self, images, labels=None, training=False, init=False, dropout_seed=None):
        """images: float [B, H, W, C] in [-1, 1]; labels: int [B] or None.

        dropout_seed: [2] ints that decide every dropout mask of this call (training
        passes one per step and replica, so resumed runs draw the same masks); None
        draws fresh masks. Returns float32 mixture parameters [B, H, W, num_params].
        """
        x = tf.cast(images, self.compute_dtype)
        h = self.one_hot(labels)
        seed = dropout_seed
        x = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)  # the extra ones channel

        run = dict(h=h, training=training, init=init, seed=seed)
        u = down_shift(self.first_u(x, init=init))
        ul = down_shift(self.first_ul_above(x, init=init)) + right_shift(
            self.first_ul_left(x, init=init)
        )
        stack = [(u, ul)]  # every (u, ul) the first half produces, read back by the second
        for level in self.up:
            stack += level.forward(u, ul, **run)
            u, ul = stack[-1]
        u, ul = stack.pop()
        for level in self.down:
            skips = [stack.pop() for _ in level.u]
            u, ul = level.forward(u, ul, skips, **run)
        assert not stack, "every skip connection must be consumed"
        return self.out_nin(tf.nn.elu(tf.cast(ul, tf.float32)), init=init)

    # ------------------------------------------------------------------ conveniences
    def initialize(self, images, labels=None):
        """Data-dependent init of every weight-normalised layer on one batch.

        images: float [B, H, W, C] in [-1, 1]. Run it once, before training (never on
        resume). Unlike the authors' code, dropout is off in this pass, so the init is
        deterministic and the statistics hold exactly for the inference network.
        Under a tf.distribute strategy call it in cross-replica context (inside
        ``strategy.scope()``, outside ``strategy.run``).
        """
        return self(images, labels, training=False, init=True)

    def log_prob(self, images, labels=None, training: bool = False):
        """Log-likelihood in nats [B] of integer images [B, H, W, C] in [0, 2**num_bits)."""
        images = tf.convert_to_tensor(images)
        checks.check_integer_images(images, self.image_shape, self.num_bits)
        return self.unit_log_prob(likelihood.to_unit_range(images, self.num_bits), labels, training)

    def unit_log_prob(self, x, labels=None, training: bool = False):
        """Log-likelihood in nats [B] of float [B, H, W, C] on the grid (not checked)."""
        params = self(x, labels, training=training)
        return likelihood.mixture_log_prob(x, params, self.num_bits, validate=False)

    # The architecture, read from the config (one copy of each value).
    image_shape = property(lambda self: self.config.image_shape)
    residual_blocks = property(lambda self: self.config.residual_blocks)
    residual_layers_per_block = property(lambda self: self.config.residual_layers_per_block)
    filters = property(lambda self: self.config.filters)
    num_mixtures = property(lambda self: self.config.num_mixtures)
    dropout_rate = property(lambda self: self.config.dropout_rate)
    num_classes = property(lambda self: self.config.num_classes)
    num_bits = property(lambda self: self.config.num_bits)

    def config_summary(self) -> dict:
        """The architecture as JSON values (what model.json holds)."""
        return self.config.to_json()

    def build_variables(self) -> None:
        """Creates the variables with one call on a zero image (and label)."""
        labels = tf.zeros([1], tf.int32) if self.num_classes else None
        self(tf.zeros([1, *self.image_shape]), labels)

    # Keras-native saving (model.save("m.keras"), keras.saving.load_model): the
    # architecture rebuilds the network; the variables are created before loading.
    def get_config(self) -> dict:
        return self.config.to_json() | {
            "recompute_activations": self.recompute_activations,
            "name": self.name,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)

    def get_build_config(self) -> dict:
        return {"built": bool(self.built)}

    def build_from_config(self, config: dict) -> None:
        if config.get("built") and not self.built:
            self.build_variables()


internals.keep_constructor_signature(PixelCNNPP)
