"""The obvious PixelCNN++: the speed baseline every trick of the package is timed against.

The same network as ``pixelcnn.PixelCNNPP`` (same layers, same order of variables, so
``copy_weights`` makes the two compute the same function), written the way one would
write it first: Keras layers whose ``call`` reads like the paper, ``tf.nn`` ops, Python
slicing for the shifts and crops, ``concat_elu`` as ``elu(concat(x, -x))`` everywhere
it is needed, ``keras.layers.Dropout``, autodiff gradients, Keras' Adam and a plain
EMA update. ``benchmarks/speed_ab.py`` runs its steps and the package's in one process,
alternating, and reports the time ratios.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pixelcnn import likelihood
from pixelcnn.model import downsampled_sizes


def concat_elu(x):
    return tf.nn.elu(tf.concat([x, -x], axis=-1))


def down_shift(x):
    return tf.pad(x[:, :-1], [[0, 0], [1, 0], [0, 0], [0, 0]])


def right_shift(x):
    return tf.pad(x[:, :, :-1], [[0, 0], [0, 0], [1, 0], [0, 0]])


class WeightNormConv(keras.layers.Layer):
    """g * v / ||v|| convolution plus bias; causal padding by ``shift`` ("down",
    "down_right", or None for 1x1); ``transpose``: a stride-2 transposed conv cropped
    causally and then to ``target_hw``."""

    def __init__(self, filters, kernel_size=(1, 1), shift=None, strides=1, transpose=False, **kw):
        super().__init__(**kw)
        self.filters, self.kernel_size, self.shift = filters, tuple(kernel_size), shift
        self.strides, self.transpose = strides, transpose

    def build(self, input_shape):
        c = int(input_shape[-1])
        kh, kw = self.kernel_size
        shape = (kh, kw, self.filters, c) if self.transpose else (kh, kw, c, self.filters)
        self.v = self.add_weight(name="v", shape=shape, initializer="random_normal")
        self.g = self.add_weight(name="g", shape=(self.filters,), initializer="ones")
        self.b = self.add_weight(name="b", shape=(self.filters,), initializer="zeros")

    def call(self, x, target_hw=None):
        kh, kw = self.kernel_size
        if self.transpose:
            kernel = tf.nn.l2_normalize(self.v, axis=[0, 1, 3]) * self.g[:, None]
            n, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
            out = [n, 2 * h + kh - 1, 2 * w + kw - 1, self.filters]
            y = tf.nn.conv2d_transpose(x, kernel, out, strides=2, padding="VALID")
            left = (kw - 1) // 2 if self.shift == "down" else 0
            return y[:, : target_hw[0], left : left + target_hw[1]] + self.b
        kernel = tf.nn.l2_normalize(self.v, axis=[0, 1, 2]) * self.g
        if self.shift == "down":
            x = tf.pad(x, [[0, 0], [kh - 1, 0], [(kw - 1) // 2, (kw - 1) // 2], [0, 0]])
        elif self.shift == "down_right":
            x = tf.pad(x, [[0, 0], [kh - 1, 0], [kw - 1, 0], [0, 0]])
        return tf.nn.conv2d(x, kernel, self.strides, "VALID") + self.b


class GatedResnet(keras.layers.Layer):
    def __init__(self, filters, shift, has_aux, num_classes, dropout_rate, **kw):
        super().__init__(**kw)
        kernel = (2, 3) if shift == "down" else (2, 2)
        self.conv1 = WeightNormConv(filters, kernel, shift, dtype=self.dtype_policy)
        self.nin_aux = WeightNormConv(filters, dtype=self.dtype_policy) if has_aux else None
        self.dropout = keras.layers.Dropout(dropout_rate, dtype=self.dtype_policy)
        self.conv2 = WeightNormConv(2 * filters, kernel, shift, dtype=self.dtype_policy)
        self.label_proj = (
            keras.layers.Dense(2 * filters, use_bias=False, dtype=self.dtype_policy)
            if num_classes
            else None
        )

    def call(self, x, a=None, h=None, training=False):
        c = self.conv1(concat_elu(x))
        if a is not None:
            c = c + self.nin_aux(concat_elu(a))
        c = self.conv2(self.dropout(concat_elu(c), training=training))
        if h is not None:
            c = c + self.label_proj(h)[:, None, None, :]
        p, q = tf.split(c, 2, axis=-1)
        return x + p * tf.sigmoid(q)


class ReferencePixelCNNPP(keras.Model):
    """Arguments as ``PixelCNNPP`` (architecture only); call(images, labels, training)."""

    def __init__(
        self,
        image_shape,
        residual_blocks=3,
        residual_layers_per_block=5,
        filters=160,
        num_mixtures=10,
        dropout_rate=0.5,
        num_classes=None,
        num_bits=8,
        dtype=None,
    ):
        super().__init__(dtype=dtype)
        self.image_shape, self.num_classes, self.num_bits = (
            tuple(image_shape),
            num_classes,
            num_bits,
        )
        self.sizes = downsampled_sizes(image_shape[0], image_shape[1], residual_blocks)
        p, nr, f = self.dtype_policy, residual_layers_per_block, filters

        def resnet(shift, has_aux):
            return GatedResnet(f, shift, has_aux, num_classes, dropout_rate, dtype=p)

        self.first_u = WeightNormConv(f, (2, 3), "down", dtype=p)
        self.first_ul_above = WeightNormConv(f, (1, 3), "down", dtype=p)
        self.first_ul_left = WeightNormConv(f, (2, 1), "down_right", dtype=p)
        self.up = []  # per resolution: (u resnets, ul resnets, halving convs or None)
        for r in range(residual_blocks):
            u = [resnet("down", False) for _ in range(nr)]
            ul = [resnet("down_right", True) for _ in range(nr)]
            halve = None
            if r + 1 < residual_blocks:
                halve = (
                    WeightNormConv(f, (2, 3), "down", 2, dtype=p),
                    WeightNormConv(f, (2, 2), "down_right", 2, dtype=p),
                )
            self.up.append((u, ul, halve))
        self.down = []  # from the lowest resolution: (resolution, u, ul, doubling convs)
        for r in reversed(range(residual_blocks)):
            n = nr if r == residual_blocks - 1 else nr + 1
            u = [resnet("down", True) for _ in range(n)]
            ul = [resnet("down_right", True) for _ in range(n)]
            double = None
            if r > 0:
                double = (
                    WeightNormConv(f, (2, 3), "down", transpose=True, dtype=p),
                    WeightNormConv(f, (2, 2), "down_right", transpose=True, dtype=p),
                )
            self.down.append((r, u, ul, double))
        n_params = likelihood.num_params(image_shape[-1], num_mixtures)
        self.out_nin = WeightNormConv(n_params, dtype="float32")

    def call(self, images, labels=None, training=False):
        x = tf.cast(images, self.compute_dtype)
        h = None
        if self.num_classes:
            h = tf.one_hot(labels, self.num_classes, dtype=self.compute_dtype)
        x = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)
        u = down_shift(self.first_u(x))
        ul = down_shift(self.first_ul_above(x)) + right_shift(self.first_ul_left(x))
        us, uls = [u], [ul]
        for u_blocks, ul_blocks, halve in self.up:
            for u_block, ul_block in zip(u_blocks, ul_blocks, strict=True):
                u = u_block(u, h=h, training=training)
                ul = ul_block(ul, a=u, h=h, training=training)
                us.append(u)
                uls.append(ul)
            if halve is not None:
                u, ul = halve[0](u), halve[1](ul)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        for r, u_blocks, ul_blocks, double in self.down:
            for u_block, ul_block in zip(u_blocks, ul_blocks, strict=True):
                u = u_block(u, a=us.pop(), h=h, training=training)
                ul = ul_block(ul, a=tf.concat([u, uls.pop()], -1), h=h, training=training)
            if double is not None:
                u = double[0](u, target_hw=self.sizes[r - 1])
                ul = double[1](ul, target_hw=self.sizes[r - 1])
        return self.out_nin(tf.nn.elu(tf.cast(ul, tf.float32)))

    def build_variables(self):
        labels = tf.zeros([1], tf.int32) if self.num_classes else None
        self(tf.zeros([1, *self.image_shape]), labels)


def copy_weights(source, reference: ReferencePixelCNNPP) -> None:
    """Gives ``reference`` the weights of a built ``PixelCNNPP`` (the same variables in
    the same order; shapes are checked)."""
    theirs, ours = source.trainable_variables, reference.trainable_variables
    if len(theirs) != len(ours):
        raise ValueError(f"{len(theirs)} variables against {len(ours)}: not the same network")
    for s, r in zip(theirs, ours, strict=True):
        if tuple(s.shape) != tuple(r.shape):
            raise ValueError(f"{s.path} {s.shape} against {r.path} {r.shape}")
        r.assign(s)


class ReferenceTrainer:
    """The plain training and evaluation steps: autodiff, Keras' Adam with the
    per-step decay, and the EMA as decay * ema + (1 - decay) * weights."""

    def __init__(self, arch: dict, precision: str, ema_decay: float = 0.9995):
        policy = "mixed_bfloat16" if precision == "bfloat16" else "float32"
        self.model = ReferencePixelCNNPP(**arch, dtype=policy)
        self.ema = ReferencePixelCNNPP(**arch, dtype="float32")
        self.model.build_variables()
        self.ema.build_variables()
        schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, 1, 0.999995)
        self.optimizer = keras.optimizers.Adam(schedule, beta_1=0.95, beta_2=0.9995)
        self.optimizer.build(self.model.trainable_variables)
        self.decay = ema_decay
        self.num_bits = self.model.num_bits
        self.train_step = tf.function(self._train_step)
        self.eval_step = tf.function(self._eval_step)

    def _train_step(self, batch):
        images = batch["images"]
        with tf.GradientTape() as tape:
            params = self.model(images, batch.get("labels"), training=True)
            # validate=False as in the package's step (the data are checked once upstream)
            nll = -likelihood.mixture_log_prob(images, params, self.num_bits, validate=False)
            loss = tf.reduce_mean(nll)
        weights = self.model.trainable_variables
        grads = tape.gradient(loss, weights)
        self.optimizer.apply_gradients(zip(grads, weights))
        for e, w in zip(self.ema.trainable_variables, weights, strict=True):
            e.assign(self.decay * e + (1.0 - self.decay) * w)
        return loss

    def _eval_step(self, batch):
        images = batch["images"]
        params = self.ema(images, batch.get("labels"), training=False)
        nll = -likelihood.mixture_log_prob(images, params, self.num_bits, validate=False)
        return tf.reduce_sum(nll)
