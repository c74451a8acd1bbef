"""The run machinery every trainer shares: processes, the output folder, atomic checkpoints,
resume with the saved config, crash-safe metrics, the non-finite-loss stop, progress.

A trainer (``seed.training.loop`` for the tokenizer, ``seed.training.llm`` for SEED-LLaMA) brings
only its model, data and step; everything about the run's files and processes is here, so both
write one checkpoint format and resume one way. The shape of a trainer::

    run = Run(cfg, resume=resume, overrides=overrides, schema=MyConfig)  # processes, OUT checked,
    cfg = run.cfg              # on resume: the checkpoint's config (+ run-only overrides)
    model = build(cfg)         # the RNGs are seeded with cfg.train.seed + rank before this
    optimizer = ...
    if run.resumed:            # run.tensors / run.state: what the trainer saved last time
        model.load_state_dict(run.tensors, strict=False); optimizer.load_state_dict(run.state["optimizer"])
    loader = build_loader(..., start=run.state["position"] if run.resumed else 0)
    run.begin(total_steps)     # restores this rank's RNG states, trims metrics.jsonl, writes config.yaml
    step = run.start_step
    while step < total_steps:
        loss = ...; run.check_finite(step + 1, {"loss": loss})  # collective, before optimizer.step()
        optimizer.step(); step += 1
        run.log({"step": step, "loss": ..., "lr": ...})
        if run.save_due(step):     # every save_every steps and the last (total_steps from begin)
            run.save(step, trainable_tensors, {"optimizer": optimizer.state_dict(), "position": ...})
    run.close()

and a script's ``main`` returns ``run_script(body, log)`` (exit statuses below).

Config: the trainer's ``train:`` section subclasses `RunSection` (``output_dir``, ``max_steps``,
``save_every``, ``keep_last``, ``seed``, ``log_every``, ``eval_every``, ``tensorboard``, ``progress``).

Watching (`Run.log`): a row's numbers go to metrics.jsonl and TensorBoard (``OUT/tensorboard``:
``train/KEY``, and ``val/NAME`` for a ``val_NAME`` key such as ``val_loss``); rank 0 shows a tqdm
bar when stderr is a terminal (log lines are printed above it), and in a log file (stderr not a
terminal) no bar: one log line every ``log_every`` steps, and on every step with a ``val_`` value.
A trainer's held-out evaluation runs under `preserved_rng` with the model in eval mode, so it
never changes the training that follows.

One run per output folder: ``OUT/.lock`` (`lock_output_dir`, the lock of ``tokenize_dataset.py``)
is held from `Run` to `Run.close`; a second run into a live run's folder (fresh or ``--resume``) is
refused before it touches anything, naming the holder's pid, host and start; a lock left by a
process that died (kill -9) on this host is taken over with a warning.

Checkpoints: ``OUT/checkpoints/step_XXXXXXXX/`` holds ``model.safetensors`` (the tensors the
trainer passes: its trainable parameters, by name), ``state.pt`` (``format``, ``step``,
``world_size``, ``rng``: the torch/CUDA/numpy/python RNG states of every rank, and whatever the
trainer adds: optimizer, scheduler, scaler, data position...; plain tensors, numbers, strings,
lists and dicts, read with ``torch.load(weights_only=True)``) and ``config.yaml`` (the run's
resolved config). Each is written into ``.step_XXXXXXXX.tmp``, fsynced, and renamed into place,
so a ``step_`` folder is always complete. ``keep_last`` deletes older folders only after a new one
is complete. A checkpoint is never written with a non-finite tensor (`NonFiniteError`).

Resume (`config_for_resume`): the newest checkpoint's ``config.yaml`` is the run's config. Keys
in ``run_only`` (`RUN_ONLY`: where the outputs go, how long, how often to save/log, progress,
DataLoader workers) take a value given on the command line; any other key given on the command
line with a value different from the saved one is refused (`seed.InputError` naming the key and
both values); a value the config *file* changed since is ignored with a warning (the checkpoint's
is used). ``OUT/config.yaml`` is rewritten with the config actually used.

Metrics (`MetricsLog`): ``OUT/metrics.jsonl``, one JSON object per step (at least ``step``),
appended and flushed line by line. On start the file is rewritten (atomically) keeping only
complete lines of steps up to the resumed step: a torn last line from a crash or a full disk,
and the lines of steps after the last checkpoint, are dropped.

Exit statuses of the training scripts (`run_script`): 0 done; 2 could not start or go on (bad
argument, config, input, checkpoint, output folder); 3 `NonFiniteError` (a non-finite loss or
weights: the run stopped before the bad update, no checkpoint or export written with it, its
last good checkpoint kept); 130 Ctrl-C.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from ..config import validate
from ..dataset import OutputLock, fsync_path
from ..errors import CheckpointError, InputError
from .config import RunSection  # noqa: F401  (the run settings every trainer's train: section has)

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^step_(\d{8})$")
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "state.pt", "config.yaml"
METRICS_FILE = "metrics.jsonl"
FORMAT = 1

EXIT_OK, EXIT_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3, 130

RUN_ONLY = frozenset({"train.output_dir", "train.max_steps", "train.save_every", "train.keep_last",
                      "train.log_every", "train.tensorboard", "train.progress", "data.num_workers",
                      "train.eval_every", "data.val", "data.val_batch_size"})
"""Keys that may change on resume: they change where and how long a run goes and what is watched
(the held-out set and how often it is evaluated), not what it trains."""


class NonFiniteError(RuntimeError):
    """A loss or a tensor about to be saved is NaN or infinite: the run stops (exit status 3),
    keeping its last good checkpoint."""


# --- processes ----------------------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed() -> Dist:
    """Join torchrun's process group from its environment variables (none set: 1 process).

    NCCL when CUDA is available, else gloo; each process uses GPU ``LOCAL_RANK``.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return Dist(rank, world, local, device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --- RNG states as plain tensors (weights_only-loadable) ----------------------------------------

def rng_state(device: torch.device) -> dict:
    """The torch (CPU and this CUDA device), numpy and python RNG states, as tensors and numbers."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block (an evaluation) without touching the training's random streams: the torch,
    CUDA (``device``), numpy and python RNG states are restored afterwards."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_cpu(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.cpu()
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    return v


# --- the output folder --------------------------------------------------------------------------

def prepare_output_dir(path: str | os.PathLike, what: str = "train.output_dir") -> Path:
    """Create ``path`` (and its parents) and check a file can be written in it, before anything
    heavy is built. Raises `seed.InputError` naming ``what`` (the option), the folder and the reason."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{what} {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{what} {out}: cannot create or write to it ({e.strerror or e})") from None
    return out


def lock_output_dir(out: Path, d: Dist) -> OutputLock | None:
    """Lock ``out`` for this run (``OUT/.lock``, `seed.dataset.OutputLock`, as ``tokenize_dataset.py``):
    rank 0 takes it, every rank learns the verdict (collective). Another live run in the folder is
    a `seed.InputError` on every rank naming its pid, host and start; a lock left by a dead process
    on this host is taken over. Returns the lock on rank 0 (release it when the run ends), else None."""
    lock, refused = None, None
    if d.main:
        lock = OutputLock(out, option="train.output_dir")
        try:
            lock.acquire()
        except InputError as e:
            lock, refused = None, str(e)
    if d.world_size > 1:
        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused:
        raise InputError(refused)
    return lock


# --- checkpoints --------------------------------------------------------------------------------

def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders under ``OUTPUT/checkpoints``, oldest first."""
    d = Path(output_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity (empty: all finite)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def write_checkpoint(folder: Path, tensors: Mapping[str, torch.Tensor], state: dict, config_yaml: str) -> None:
    """Write one checkpoint folder atomically: into ``.NAME.tmp``, fsync every file and the
    folder, then rename to ``NAME`` (replacing an older one of the same name) and fsync the parent.

    ``tensors``: name -> tensor (any device/dtype; saved as safetensors). ``state``: plain data
    (tensors, numbers, strings, lists, dicts) for ``state.pt``. Raises `NonFiniteError` (nothing
    written) when a tensor holds a NaN or an infinity."""
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteError(f"not writing checkpoint {folder}: non-finite values in {', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}")
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / MODEL_FILE),
              metadata={"format": "pt"})
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE):
        fsync_path(tmp / name)
    fsync_path(tmp)
    if folder.exists():
        old = parent / f".{folder.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    fsync_path(parent)


def read_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors by name, state)`` of a checkpoint folder written by `write_checkpoint` (CPU)."""
    folder = Path(folder)
    for name in (MODEL_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing; not a checkpoint folder of a seed training run")
    try:
        return load_file(str(folder / MODEL_FILE)), torch.load(folder / STATE_FILE, weights_only=True,
                                                                map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoint folders (0: keep all)."""
    if keep_last:
        for old in checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


# --- the config of a resumed run ----------------------------------------------------------------

def load_checkpoint_config(folder: str | os.PathLike, schema: type) -> DictConfig:
    """The ``config.yaml`` saved in a checkpoint folder, validated by ``schema``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; cannot tell which config this checkpoint was trained with")
    try:
        return validate([OmegaConf.load(path)], schema, str(path))
    except InputError as e:
        raise CheckpointError(f"the checkpoint's config does not fit this version of seed: {e}") from None


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The dotted keys of ``key=value`` overrides (``+``/``~`` prefixes dropped)."""
    return [o.split("=", 1)[0].lstrip("+~").strip() for o in overrides]


def _flat(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            if not node and prefix:
                out[prefix] = {}
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_for_resume(saved: DictConfig, current: DictConfig, overrides: Sequence[str] | None = None,
                      run_only: Collection[str] = RUN_ONLY, what: str = "--resume") -> DictConfig:
    """The config a resumed run (or an export of a checkpoint) uses: ``saved`` (the checkpoint's),
    with the ``run_only`` keys the command line sets taken from ``current``.

    ``overrides``: the command line's ``key=value`` strings (None: every key of ``current`` counts
    as given, as for a config built in Python). A given key outside ``run_only`` whose value
    differs from the saved one raises `seed.InputError` naming the key and both values; a value
    that differs only because the config file says otherwise is ignored with a warning.
    ``train.output_dir`` always comes from ``current`` (it is where the checkpoint was found).
    """
    given = override_keys(overrides) if overrides is not None else None
    old, new = _flat(saved), _flat(current)
    refused, ignored, taken = [], [], {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:  # a missing key counts as None (a null section vs. one with all-null keys)
            continue
        explicit = given is None or _under(key, given)
        if _under(key, run_only) or key == "train.output_dir":
            if explicit or key == "train.output_dir":
                taken[key] = b
        elif explicit:
            refused.append(f"{key} (checkpoint: {a!r}, given: {b!r})")
        else:
            ignored.append(f"{key} (config file: {b!r}, checkpoint: {a!r})")
    if refused:
        raise InputError(f"{what}: the checkpoint was trained with other values of {'; '.join(refused)}. "
                         f"A resumed run and an export use the checkpoint's config for everything that shapes "
                         f"the model or the data; drop these overrides (only {', '.join(sorted(run_only))} may "
                         f"change), or start a new run in another train.output_dir")
    if ignored:
        logger.warning("%s: using the checkpoint's config, not the config file's, for %s", what, "; ".join(ignored))
    cfg = copy.deepcopy(saved)
    for key, value in taken.items():
        if old.get(key) != value:
            logger.info("%s: %s = %r (was %r)", what, key, value, old.get(key))
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


# --- metrics ------------------------------------------------------------------------------------

class MetricsLog:
    """``OUT/metrics.jsonl``: one JSON object per step, safe against torn lines.

    `start` keeps the complete lines of steps ``<= step`` (rewriting the file atomically);
    `write` appends one line and flushes. Non-finite numbers are written as ``null``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = None

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict]:
        """The complete rows of a metrics file (a torn or unreadable line is skipped)."""
        rows = []
        p = Path(path)
        if not p.is_file():
            return rows
        with open(p, "rb") as f:
            for raw in f:
                try:  # a torn line (crash, full disk) does not parse: skipped
                    row = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
        return rows

    def start(self, step: int) -> None:
        """Drop rows past ``step`` (a fresh run: 0) and torn lines, then open for appending."""
        if self.path.is_file():
            lines = len(self.path.read_bytes().splitlines())
            keep = [r for r in self.read(self.path) if r["step"] <= step]
            if len(keep) != lines:
                logger.info("%s: keeping the %d rows up to step %d (dropped %d later, torn or unreadable lines)",
                            self.path, len(keep), step, lines - len(keep))
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def write(self, row: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def quiet_library_bars() -> None:
    """Turn off the tqdm bars of transformers (loading, "Writing model shards") and huggingface_hub:
    in a log file their frames would sit between the log lines."""
    try:
        import transformers.utils.logging as tl

        tl.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


# --- the run ------------------------------------------------------------------------------------

class Run:
    """One training run's processes and files (see the module docstring for the trainer's side).

    Construction, on every rank: joins the process group (`setup_distributed`), checks
    ``train.output_dir`` can be created and written (`prepare_output_dir`), locks it for this run
    (`lock_output_dir`: a second run into a live run's folder is refused), refuses a fresh run
    into a folder holding checkpoints, on ``resume`` reads the newest checkpoint and makes its
    config the run's (`config_for_resume`), checks TensorBoard is importable when asked, and seeds
    every RNG with ``train.seed + rank``. Nothing heavy is built, so bad input fails in seconds.

    ``command``: the script's command line ``[script, *args]`` (None: ``sys.argv``), for the model card.

    Attributes: ``cfg`` (the config to train with), ``dist`` (`Dist`), ``out_dir``, ``checkpoint``
    (the folder resumed from, or None), ``tensors`` and ``state`` (its contents, or None),
    ``start_step`` (0 or the resumed step), ``resumed``.
    """

    def __init__(self, cfg: DictConfig, *, resume: bool = False, overrides: Sequence[str] | None = None,
                 schema: type | None = None, run_only: Collection[str] = RUN_ONLY, command: Sequence[str] | None = None):
        self.command = list(sys.argv if command is None else command)  # for the export's model card
        self.dist = d = setup_distributed()
        self.out_dir = prepare_output_dir(cfg.train.output_dir)
        self.lock = lock_output_dir(self.out_dir, d)
        try:
            self._start(cfg, resume, overrides, schema, run_only)
        except BaseException:
            self._unlock()
            raise

    def _start(self, cfg: DictConfig, resume: bool, overrides: Sequence[str] | None, schema: type | None,
               run_only: Collection[str]) -> None:
        d = self.dist
        found = checkpoints(self.out_dir)
        if found and not resume:
            raise InputError(f"{self.out_dir} already holds checkpoints ({found[-1].name}): pass --resume to continue "
                             f"that run, or choose another train.output_dir")
        if resume and not found:
            logger.warning("--resume: no checkpoint in %s; starting from the beginning", self.out_dir / "checkpoints")
        self.checkpoint: Path | None = found[-1] if resume and found else None
        self.tensors: dict[str, torch.Tensor] | None = None
        self.state: dict | None = None
        self.start_step = 0
        if self.checkpoint is not None:
            if schema is None:
                raise TypeError("Run(resume=True) needs the config schema to read the checkpoint's config")
            cfg = config_for_resume(load_checkpoint_config(self.checkpoint, schema), cfg, overrides, run_only)
            self.tensors, self.state = read_checkpoint(self.checkpoint)
            self.start_step = int(self.state["step"])
        self.cfg = cfg
        self.tensorboard = bool(cfg.train.tensorboard) and d.main
        if cfg.train.tensorboard is not False and d.main:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                if cfg.train.tensorboard:
                    raise InputError("train.tensorboard=true needs the tensorboard package: ./install.sh installs it "
                                     f"into .venv (or: {sys.executable} -m pip install tensorboard); or pass "
                                     "train.tensorboard=false") from None
                logger.info("tensorboard is not installed: no TensorBoard logs (metrics.jsonl has every step)")
            else:
                self.tensorboard = True
        if not (cfg.train.progress and sys.stderr.isatty()):
            quiet_library_bars()
        self.metrics = MetricsLog(self.out_dir / METRICS_FILE)
        self.writer = None
        self.bar = None
        self._redirect = None
        self._postfix: dict[str, str] = {}
        self._t0, self._step0 = 0.0, 0
        self.total_steps = 0
        seed_everything(cfg.train.seed + d.rank)

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    def begin(self, total_steps: int) -> None:
        """Call once the model, optimizer and data loader are built (and loaded from ``state``):
        restores this rank's RNG states (a run with another world size keeps fresh ones, warned),
        trims ``metrics.jsonl`` to the start step, writes ``OUT/config.yaml``, opens TensorBoard
        and the progress bar (rank 0)."""
        from tqdm import tqdm

        d = self.dist
        self.total_steps = total_steps
        if self.state is not None:
            rngs = self.state.get("rng", [])
            if len(rngs) == d.world_size:
                set_rng_state(rngs[d.rank], d.device)
            else:
                logger.warning("resuming with %d processes (was %d): fresh RNG states; not bit-for-bit",
                               d.world_size, len(rngs))
            logger.info("resumed from %s (step %d)", self.checkpoint, self.start_step)
        if d.main:
            self.metrics.start(self.start_step)
            (self.out_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(self.cfg))
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        # a bar only on a terminal: in a log file tqdm's carriage-return frames would interleave with
        # the log lines, which are the progress there
        bar = d.main and self.cfg.train.progress and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=self.start_step, unit="step", dynamic_ncols=True, disable=not bar)
        if bar:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()  # log lines are printed above the bar
            self._redirect.__enter__()
        self._t0, self._step0 = time.perf_counter(), self.start_step

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` OR-ed over the ranks (collective), so every rank stops together."""
        if self.dist.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.dist.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def check_finite(self, step: int, values: Mapping[str, float | torch.Tensor]) -> None:
        """Raise `NonFiniteError` on every rank if any rank's value (losses, preferably reduced
        over ranks) is NaN or infinite. Collective: call on every rank, before
        ``optimizer.step()``, so the weights stay as they were."""
        bad = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
        if self._any_rank(bool(bad)) and not bad:
            raise NonFiniteError(f"step {step}: another process saw a non-finite loss; stopped")
        if bad:
            last = latest_checkpoint(self.out_dir)
            raise NonFiniteError(
                f"step {step}: non-finite {', '.join(f'{k} {v}' for k, v in bad.items())}; stopped. "
                f"The last good checkpoint is {last if last else '(none: no checkpoint was written yet)'}. "
                f"Lower the learning rate (or check the data) and start again")

    def log_due(self, step: int) -> bool:
        """True on the steps that get a log line (every ``log_every`` and the last)."""
        return step % self.cfg.train.log_every == 0 or step == self.total_steps

    def log(self, row: Mapping[str, Any]) -> None:
        """One step's metrics (``row["step"]`` required): metrics.jsonl, TensorBoard (``train/KEY``;
        a ``val_NAME`` key as ``val/NAME``), the bar, and a log line on `log_due` steps and on steps
        with a ``val_`` value (numbers only; nested values such as per-source counts stay in
        metrics.jsonl). Rank 0 writes; other ranks do nothing."""
        step = row["step"]
        has_val = any(k.startswith("val_") for k in row)
        if self.dist.main:
            self.metrics.write(row)
            if self.writer is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        tag = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
                        self.writer.add_scalar(tag, v, step)
            if self.log_due(step) or has_val:
                logger.info("%s", self.log_line(row))
        if self.bar is not None and not self.bar.disable:
            self.bar.update(step - self.bar.n)
            self._postfix.update({k: f"{row[k]:.4g}" for k in ("loss", "val_loss") if isinstance(row.get(k), float)})
            if self._postfix:  # the last val_loss stays shown until the next evaluation
                self.bar.set_postfix(self._postfix)

    def log_line(self, row: Mapping[str, Any]) -> str:
        """``step 40/100 (40%)  loss 2.31  val_loss 2.45  lr 0.00015 ...  eta 0:01:12``: a row's numbers
        (floats to 4 significant digits) and the time left at this run's pace."""
        step = row["step"]
        parts = [f"step {step}/{self.total_steps}" + (f" ({100 * step // self.total_steps}%)" if self.total_steps else "")]
        order = ["loss", "val_loss"] + [k for k in row if k not in ("step", "loss", "val_loss")]
        for k in order:
            v = row.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        done = step - self._step0
        if done > 0 and self.total_steps > step:
            left = (time.perf_counter() - self._t0) / done * (self.total_steps - step)
            parts.append(f"eta {datetime.timedelta(seconds=round(left))}")
        return "  ".join(parts)

    def save_due(self, step: int) -> bool:
        """True on the steps that get a checkpoint (every ``save_every`` and the last)."""
        return step % self.cfg.train.save_every == 0 or step == self.total_steps

    def save(self, step: int, tensors: Mapping[str, torch.Tensor], state: dict) -> Path:
        """Write checkpoint ``step`` (collective: call on every rank). Gathers every rank's RNG
        states; rank 0 writes ``tensors`` + ``state`` (+ ``format``, ``step``, ``world_size``,
        ``rng``) and the config atomically, then prunes to ``keep_last``. Raises `NonFiniteError`
        on every rank (nothing written, nothing pruned) when a tensor is not finite."""
        d = self.dist
        bad = non_finite(tensors)
        if self._any_rank(bool(bad)) and not bad:  # e.g. FSDP: only rank 0 holds the full tensors
            raise NonFiniteError(f"step {step}: another process holds non-finite weights; not saved, stopped")
        if bad:
            last = latest_checkpoint(self.out_dir)
            raise NonFiniteError(f"step {step}: non-finite weights in {', '.join(bad[:5])}; not saved, stopped. "
                                 f"The last good checkpoint is {last if last else '(none)'}")
        rng = rng_state(d.device)
        if d.world_size > 1:
            states: list = [None] * d.world_size
            dist.all_gather_object(states, rng)
            states = [_to_cpu(s) for s in states]
        else:
            states = [rng]
        folder = self.out_dir / "checkpoints" / f"step_{step:08d}"
        if d.main:
            full = {"format": FORMAT, "step": step, "world_size": d.world_size, "rng": states, **state}
            write_checkpoint(folder, tensors, full, OmegaConf.to_yaml(self.cfg))
            logger.info("checkpoint %s", folder)
            prune_checkpoints(self.out_dir, self.cfg.train.keep_last)
        d.barrier()
        return folder

    def close(self) -> None:
        """Close the bar, metrics.jsonl and TensorBoard, and unlock the folder (also after an error)."""
        if self.bar is not None:
            self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._unlock()

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def script_logger(name: str) -> logging.Logger:
    """Logging for a training script, one process or a torchrun job: rank 0 logs at INFO, the
    other ranks at WARNING, every line tagged with its rank (torchrun's ``RANK``)."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return logging.getLogger(name)


def run_script(body: Callable[[], int | None], log: logging.Logger) -> int:
    """Run a training script's ``body`` and map what ends it to the documented exit status:
    0 done; 2 `seed.InputError`/`seed.CheckpointError` (logged as one line); 3 `NonFiniteError`;
    130 Ctrl-C. Leaves the process group in every case."""
    try:
        code = body()
        return EXIT_OK if code is None else code
    except (InputError, CheckpointError) as e:
        log.error("%s", e)
        return EXIT_INPUT
    except NonFiniteError as e:
        log.error("%s", e)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        log.error("interrupted; resume with --resume from the last checkpoint")
        return EXIT_INTERRUPTED
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
