"""The training commands: single, multigpu, multiworker (``training.train`` under a
strategy, with the --config files and --binding overrides)."""

from __future__ import annotations

import json
import sys

import click

from pixelcnn.cli.app import parse_gin


def _train(ctx, kind: str, device: str | None = None) -> None:
    from pixelcnn import distribute, rundir
    from pixelcnn.training import faults
    from pixelcnn.training.train import train

    parse_gin(ctx.obj["configs"], ctx.obj["bindings"])
    run_dir = ctx.obj["run_dir"] or rundir.new_run_dir()
    strategy = distribute.make_strategy(kind, device)
    click.echo(f"run directory: {run_dir} ({strategy.num_replicas_in_sync} replica(s))")
    try:
        result = train(run_dir, strategy, started=faults.process_start())
    except faults.TrainingInterrupted as e:
        click.echo(e.message, err=True)
        sys.exit(130)
    except faults.WorkerLost as e:
        click.echo(f"Error: {e.message}", err=True)
        sys.exit(1)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(result, indent=2))


@click.command()
@click.option("--device", help="e.g. /cpu:0 or /gpu:1 (default: first GPU, else CPU).")
@click.pass_context
def single(ctx, device):
    """Train on one device.

    \b
    Example: pixelcnn --config experiments/quickstart.gin single"""
    _train(ctx, "single", device)


@click.command()
@click.pass_context
def multigpu(ctx):
    """Train with MirroredStrategy on all local GPUs (or logical CPU devices).

    \b
    Example: pixelcnn --config experiments/mnist.gin --binding "train.batch_size=128" multigpu"""
    _train(ctx, "multigpu")


@click.command()
@click.pass_context
def multiworker(ctx):
    """Train with MultiWorkerMirroredStrategy across the machines in TF_CONFIG.

    \b
    Example (on every machine, its own task index in TF_CONFIG):
      pixelcnn --config experiments/cifar10.gin --log-dir gs://bucket/run multiworker"""
    _train(ctx, "multiworker")


COMMANDS = (single, multigpu, multiworker)
