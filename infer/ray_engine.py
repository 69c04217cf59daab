"""`xray-infer --engine ray`: score an archive on a Ray cluster (or Ray on this machine) into a Parquet dataset.

The pipeline, streamed by Ray Data with backpressure (memory bounded whatever the number of files):
  paths (listed on the driver, in blocks) -> Scorer actors, one per node by default (read, decode and preprocess
  with xray.common in threads ahead of the model, opened once per actor for its node's CPU) -> rows back to the
  driver, which commits them to part files (xray.infer.ray_parts). Ray retries a task or actor lost with its worker or node; a row
  reaches the output once, when its block is delivered.

Ray is imported here only, and only with --engine ray: the edge install stays Ray-free.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
import pyarrow as pa

from xray.common.errors import EXIT_FAILURE, EXIT_OK, XrayError

from .model import ENV_VAR, FILES, open_model
from .ray_inputs import list_inputs
from .ray_parts import PartWriter, lock_output, prepare_output, row_schema

# Ray's CPU counts are reservations for scheduling, not limits. An actor uses every core of its node (decoding
# threads plus onnxruntime's) but reserves a quarter CPU, so an actor restarted after its node died still finds room
# on a node that has one already, and Ray Data's own small tasks are never starved.
ACTOR_CPUS = 0.25
ACTORS_START_S = 600  # the pool has this long to open the model on every node
PATHS_PER_CALL = 32  # files per actor call (a Ray Data block): small enough to spread, big enough to decode ahead


@dataclass
class Options:
    inputs: tuple
    output: str
    model_path: str | None = None
    precision: str = "auto"
    force_int8: bool = False
    ray_address: str | None = None
    actors: int | None = None
    threads_per_actor: int = 0
    batch_size: int = 16
    max_pixels: int = 0
    ood_action: str = "flag"
    resume_by: str = "path"
    path_column: str = "path"
    part_rows: int = 1000
    quiet: bool = False


@dataclass
class Tally:
    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    flagged: int = 0
    per_node: Counter = field(default_factory=Counter)

    def add(self, table):
        self.rows += table.num_rows
        self.errors.update(k for k in table.column("error_kind").to_pylist() if k)
        self.flagged += sum(1 for f in table.column("ood").to_pylist() if f)
        self.per_node.update(table.column("node_id").to_pylist())


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise XrayError("--engine ray needs Ray: pip install 'xray-edge[ray]'") from None
    return ray


def model_files(model_path: str | None, opened: Path) -> tuple[dict[str, bytes], str | None]:
    """The model file(s) to ship to the actors: ({name: bytes}, the file to open, or None for the export folder,
    so each actor picks int8 or fp32 for its own node's CPU). opened: the model the driver opened (a registered
    model is fetched once, there)."""
    given = model_path or os.environ.get(ENV_VAR)
    if given and Path(given).is_file():
        return {opened.name: opened.read_bytes()}, opened.name
    folder = opened.parent
    return {name: (folder / name).read_bytes() for name in FILES.values() if (folder / name).is_file()}, None


def run(o: Options) -> int:
    """Score o.inputs into o.output; returns the exit code (0, or 1 when some inputs failed)."""
    ray = import_ray()
    ray_address(o)  # a wrong address is refused before anything is listed or written
    model, choice = open_model(o.model_path, o.precision, 1, o.force_int8)  # checks the model, on the driver
    if choice.reason:
        click.echo(f"{'warning' if choice.forced else 'note'}: model on this machine: {model.path} ({choice.reason})",
                   err=True)
    paths, input_errors = list_inputs(o.inputs, o.path_column)
    for _, message in input_errors:
        click.echo(f"error: {message}", err=True)
    if not paths:
        raise XrayError("no input files to score" + ("" if input_errors else " (see --help)"))
    out = Path(o.output)
    info = model.info
    schema = row_schema(info.classes)
    files, model_file = model_files(o.model_path, model.path)
    start_ray(ray, o)  # before the output folder is touched: a wrong address leaves nothing behind
    writer, tally = PartWriter(out, schema, o.part_rows), Tally()
    started = time.monotonic()
    try:
        lock = lock_output(out)  # noqa: F841 (held open until the job ends)
        done = prepare_output(out, schema, info.checkpoint_sha256, o.resume_by)
        ds = build_dataset(ray, o, paths, done, files, model_file)
        with CtrlC() as ctrl_c:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                with ctrl_c.writing():
                    writer.add(block)
                    tally.add(block)
    except KeyboardInterrupt:
        writer.flush()
        click.echo(f"interrupted: {tally.rows} rows committed to {out}; run the same command again to score the rest",
                   err=True)
        sys.exit(130)
    except XrayError:
        raise
    except Exception as e:  # a worker's error Ray gave up on (the model opens on no node, a block that fails on every
        writer.flush()      # retry), Ray Data's own timeout, a full disk: one line, the rows so far kept
        raise XrayError(f"the Ray job failed ({failure_line(e)}); the {tally.rows} rows scored before are committed "
                        f"to {out}, and a re-run scores the rest", EXIT_FAILURE) from None
    finally:
        ray.shutdown()
    writer.flush()
    elapsed = time.monotonic() - started
    skipped = len(paths) - tally.rows
    print_summary(tally, skipped, elapsed, out, writer.parts)
    return EXIT_FAILURE if tally.errors or input_errors else EXIT_OK


class CtrlC:
    """Ctrl-C stops the job at once, except while a block's rows are being written: then it stops right after
    (a second Ctrl-C stops at once even there; the part files committed stay whole either way)."""

    pressed = in_write = False

    def __enter__(self):
        self.before = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.pressed or not self.in_write:
            raise KeyboardInterrupt
        self.pressed = True
        click.echo("stopping after the rows in hand are written (Ctrl-C again to stop at once)", err=True)

    @contextmanager
    def writing(self):
        self.in_write = True
        try:
            yield
        finally:
            self.in_write = False
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *_):
        signal.signal(signal.SIGINT, self.before)


def ray_address(o: Options) -> str:
    address = o.ray_address or os.environ.get("RAY_ADDRESS") or "local"  # "local": never join by accident
    if address.startswith("ray://"):  # Ray Data cannot run its streaming executor in a Ray Client driver
        raise XrayError(f"--ray-address {address}: Ray Client (ray://) cannot run a Ray Data job; run xray-infer on a "
                        "node of the cluster (--ray-address auto) or submit it with ray job submit")
    return address


def start_ray(ray, o: Options):
    """Join the cluster at --ray-address (or $RAY_ADDRESS), else start Ray on this machine."""
    address = ray_address(o)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as e:  # nobody there, a malformed address, another version
        raise XrayError(f"--ray-address {address}: cannot join the Ray cluster ({str(e).splitlines()[0][:200]})") \
            from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not o.quiet
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = ACTORS_START_S  # every node's actor up before the first block: none left idle
    # a failure Ray gives up on becomes our one line; Ray Data would log its whole stack trace first
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def build_dataset(ray, o: Options, paths, done: set, files, model_file):
    """paths -> the Scorer actor pool (spread over the nodes by Ray Data) -> rows; nothing runs until iterated.
    MALLOC_ARENA_MAX: glibc gives every decoding thread its own heap, which keeps what a 5 MP DICOM once needed."""
    from ray.data import ActorPoolStrategy

    from .ray_tasks import Scorer

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= ACTOR_CPUS]  # not a
    # head started with --num-cpus 0
    table = pa.table({"path": paths})
    ds = ray.data.from_arrow([table.slice(i, PATHS_PER_CALL) for i in range(0, len(paths), PATHS_PER_CALL)])
    return ds.map_batches(Scorer, batch_format="pyarrow", batch_size=PATHS_PER_CALL,
                          compute=ActorPoolStrategy(size=o.actors or max(1, len(nodes))), num_cpus=ACTOR_CPUS,
                          runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "2"}},
                          fn_constructor_kwargs={
                              "model_files": [ray.put(files)], "model_file": model_file, "precision": o.precision,
                              "threads": o.threads_per_actor, "force_int8": o.force_int8, "ood_action": o.ood_action,
                              "batch_size": o.batch_size, "max_pixels": o.max_pixels, "resume_by": o.resume_by,
                              "done": [ray.put(done)] if done else None})


def failure_line(e: Exception) -> str:
    """The worker's own exception as one line (a RayTaskError's text is its remote traceback)."""
    cause = getattr(e, "cause", None) or e
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return (lines[-1] if lines else type(cause).__name__)[:300]


def print_summary(t: Tally, skipped: int, elapsed: float, out: Path, parts: int):
    rate = t.rows / elapsed if elapsed > 0 else 0.0
    errors = ", ".join(f"{k} {n}" for k, n in t.errors.most_common()) or "none"
    lines = [f"scored {t.rows} files in {elapsed:.1f} s ({rate:.1f} images/s) into {out} ({parts} new part files)",
             f"  errors: {errors}; flagged out of distribution: {t.flagged}"
             + (f"; already in the output, skipped: {skipped}" if skipped else "")]
    lines += [f"  node {node[:12]}: {n} files" for node, n in sorted(t.per_node.items())]
    click.echo("\n".join(lines), err=True)
