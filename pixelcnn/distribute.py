"""Devices and tf.distribute strategies: one device, mirrored GPUs (or logical CPU
devices), several workers; and running one batch split over a strategy's replicas."""

from __future__ import annotations

import os
import platform

import tensorflow as tf


def split_cpu(num_devices: int) -> None:
    """Splits the CPU into ``num_devices`` logical devices (call before TF starts).

    Lets ``multigpu`` run several replicas on a machine without GPUs.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as e:
        if len(tf.config.list_logical_devices("CPU")) != num_devices:
            raise RuntimeError(
                "the CPU can only be split before TensorFlow has started; call split_cpu first"
            ) from e


def local_devices() -> list[str]:
    """The local GPUs, or the logical CPU devices when there is no GPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]


def make_strategy(kind: str, device: str | None = None) -> tf.distribute.Strategy:
    """'single' (one device), 'multigpu' (MirroredStrategy) or 'multiworker'.

    single: ``device`` if given, else the first GPU, else the CPU.
    multigpu: all local GPUs; without GPUs, all logical CPU devices (see split_cpu).
    multiworker: MultiWorkerMirroredStrategy across the workers named in TF_CONFIG.
    """
    if kind == "single":
        if device is None:
            device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if kind == "multigpu":
        return tf.distribute.MirroredStrategy(local_devices())
    if kind == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "multiworker needs TF_CONFIG describing the cluster, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {kind!r}: use single, multigpu or multiworker")


def inference_strategy(devices: str = "auto") -> tf.distribute.Strategy:
    """For sampling and scoring: "single" (one device), "all" (MirroredStrategy over
    every local GPU or logical CPU device) or "auto" (all when there are several)."""
    several = len(local_devices()) > 1
    if devices == "all" or (devices == "auto" and several):
        return make_strategy("multigpu")
    return make_strategy("single")


# CPU flags of native bfloat16 arithmetic (Intel AMX, AVX-512 BF16); without them
# TensorFlow emulates bfloat16 and the mixed step runs slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# The CPU's vector instruction sets that decide which kernels TensorFlow and oneDNN run,
# hence the float32 rounding of a network's outputs (BF16_CPU_FLAGS among them). A
# virtual machine may report only a vendor ("AMD EPYC") as its model name, so the model
# alone does not tell an AVX2 machine from an AVX-512 one.
KERNEL_CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def cpu_info(field: str) -> str | None:
    """The first value of ``field`` in /proc/cpuinfo ("flags", "model name"); None where
    it cannot be read (not Linux, no such field)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags; None where they cannot be read."""
    flags = cpu_info("flags")
    return None if flags is None else set(flags.split())


def device_description(flags: set[str] | None = None) -> str:
    """What a computation runs on: the CPU model and its kernel-deciding flags
    (``KERNEL_CPU_FLAGS``; the CPU's own by default), and the GPUs' models when
    TensorFlow sees any."""
    cpu = cpu_info("model name") or platform.processor() or platform.machine()
    flags = cpu_flags() if flags is None else flags
    if flags is not None:
        cpu += f" ({' '.join(f for f in KERNEL_CPU_FLAGS if f in flags) or 'no AVX2'})"
    gpus = [
        tf.config.experimental.get_device_details(g).get("device_name", g.name)
        for g in tf.config.list_physical_devices("GPU")
    ]
    return f"{platform.machine()} {cpu}" + (f"; GPUs: {', '.join(gpus)}" if gpus else "")


def gpu_capabilities() -> list[tuple[int, int]]:
    """The compute capability (major, minor) of each GPU TensorFlow sees."""
    details = [
        tf.config.experimental.get_device_details(g) for g in tf.config.list_physical_devices("GPU")
    ]
    return [tuple(d.get("compute_capability", (0, 0))) for d in details]


def choose_precision(
    flags: set[str] | None, capabilities: list[tuple[int, int]]
) -> tuple[str, str]:
    """train.precision = "auto": (precision, why) for this hardware. bfloat16 where it is
    computed natively (GPUs of compute capability 8.0 or more, CPUs with AMX or
    AVX512-BF16), float16 on GPUs of compute capability 7.x (tensor cores without
    bfloat16), float32 elsewhere and where the CPU's flags cannot be read."""
    if capabilities:
        lowest = min(capabilities)
        if lowest >= (8, 0):
            return "bfloat16", f"GPUs of compute capability {lowest} compute bfloat16"
        if lowest >= (7, 0):
            return "float16", f"GPUs of compute capability {lowest} have float16 tensor cores only"
        return "float32", f"a GPU of compute capability {lowest} (< 7.0) lacks fast half precision"
    if flags is None:
        return "float32", "the CPU's flags cannot be read"
    native = sorted(set(BF16_CPU_FLAGS) & flags)
    if native:
        return "bfloat16", f"the CPU computes bfloat16 natively ({', '.join(native)})"
    return "float32", f"the CPU lacks native bfloat16 ({' and '.join(BF16_CPU_FLAGS)} absent)"


def resolve_precision(precision: str) -> str:
    """A precision, "auto" resolved for this hardware (printed with the reason)."""
    if precision != "auto":
        return precision
    chosen, why = choose_precision(cpu_flags(), gpu_capabilities())
    print(f"precision auto: {chosen}, as {why}")
    return chosen


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether the strategy spans a cluster of workers (TF_CONFIG)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is not None and bool(resolver.cluster_spec().jobs)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def task_id(strategy: tf.distribute.Strategy) -> int:
    """This worker's index in a multi-worker cluster (0 otherwise)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id) if resolver is not None and resolver.task_id is not None else 0


def broadcast_from_first_replica(strategy: tf.distribute.Strategy, variables) -> None:
    """Makes every replica (and worker) hold replica 0's values of ``variables``."""

    def fn():
        ctx = tf.distribute.get_replica_context()
        first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float32)
        return [ctx.all_reduce(tf.distribute.ReduceOp.SUM, v * first) for v in variables]

    values = strategy.run(tf.function(fn, autograph=False))
    for v, value in zip(variables, values, strict=True):
        v.assign(strategy.experimental_local_results(value)[0])


def value(variable) -> int:
    """An integer variable's value, also for mirrored variables (cross-replica read)."""
    return int(tf.convert_to_tensor(variable).numpy())


def compile_fn(fn, spec=None):
    """``fn`` as a tf.function: for one argument of ``spec``, or for the shapes it meets.

    No autograph: the model, the likelihood and the steps have no Python control flow
    on tensors (the traced graph is the same), and converting them only lengthens each
    trace.
    """
    if spec is None:
        return tf.function(fn, reduce_retracing=True, autograph=False)
    return tf.function(fn, input_signature=[spec], autograph=False)


def replica_bounds(n: int, replicas: int) -> list[int]:
    """Where each replica's consecutive share of n items starts (and the last ends):
    sizes differ by at most one, replica i takes items [bounds[i], bounds[i + 1])."""
    return [i * n // replicas for i in range(replicas + 1)]


def run_split(strategy: tf.distribute.Strategy | None, fn, args: tuple) -> tf.Tensor:
    """fn(*args) with the batch split over the strategy's replicas, in order.

    args: tensors with the batch as their first axis, or None (passed through). Each
    replica runs fn on its consecutive share (``replica_bounds``) and the results are
    concatenated in replica order, so the output lines up with the input. Without a
    strategy, with one replica or with fewer items than replicas, fn runs once on all.
    """
    k = 1 if strategy is None else strategy.num_replicas_in_sync
    n = int(next(a for a in args if a is not None).shape[0])
    if k == 1 or n < k:  # every replica needs at least one item
        return fn(*args)
    bounds = replica_bounds(n, k)
    present = [i for i, a in enumerate(args) if a is not None]

    def part(ctx):
        lo, hi = bounds[ctx.replica_id_in_sync_group], bounds[ctx.replica_id_in_sync_group + 1]
        return tuple(args[i][lo:hi] for i in present)

    def replica_fn(values):
        full = list(args)
        for i, v in zip(present, values, strict=True):
            full[i] = v
        return fn(*full)

    values = strategy.experimental_distribute_values_from_function(part)
    out = strategy.run(replica_fn, args=(values,))
    return tf.concat(strategy.experimental_local_results(out), axis=0)


def distributed_log_prob(strategy: tf.distribute.Strategy | None, model):
    """fn(images int [B, H, W, C], labels int [B] or None) -> log p float32 [B] in nats,
    the batch split over the strategy's replicas (``run_split``), compiled once per
    shape."""
    compiled = compile_fn(lambda x, y: model.log_prob(x, y))

    def fn(images, labels=None):
        labels = None if labels is None else tf.constant(labels, tf.int32)
        return run_split(strategy, compiled, (tf.constant(images), labels))

    return fn
