"""Helpers for a training script run by `rtrain launch` (pure Python, standard library only).

    import rtrain
    ctx = rtrain.context()                       # ranks, role, attempt, run directory
    start = 0
    if (ckpt := rtrain.latest_checkpoint()) is not None:
        state = torch.load(ckpt / "state.pt"); start = state["step"]
    for step in range(start + 1, steps + 1):
        ...
        rtrain.report(step, loss=loss.item(), lr=lr, tokens=tokens_in_step)
        if step % 50 == 0:
            with rtrain.save_checkpoint(step) as d:     # rank 0 writes; others get None
                if d is not None:
                    torch.save({...}, d / "state.pt")

`report` drives the launcher's progress bar, metrics.jsonl and summary.json (rank 0 of the
training role), and counts as a heartbeat on every rank: a process that has reported and then
falls silent for `fault.heartbeat_timeout_s` is hung, killed and restarted. A process that never
reports is watched by its process state only (exit, signal).

Checkpoints follow the run's rules: written into a temporary directory, listed with their sizes
and SHA-256 in MANIFEST.json, published by one rename as `<run>/checkpoints/step-NNNNNN`, the
oldest beyond `checkpoint.keep_last` removed; `latest_checkpoint` returns the newest one whose
files match its manifest.

When the launch is stopped (Ctrl-C, SIGTERM, `rtrain stop`), each process gets SIGTERM and
`fault.stop_grace_s` to save and exit. A script that calls `stop_requested()` once before training
catches it: the call then returns True, and the script saves a checkpoint at the end of the step
(the ranks agree first, e.g. with an all-reduce of the flag) and exits.

Outside rtrain (no RTRAIN_* environment), `report` does nothing and checkpoints go under
`./checkpoints`, so the same script runs on its own.
"""

import contextlib
import hashlib
import json
import math
import os
import pathlib
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional

__all__ = ["Context", "context", "config", "report", "heartbeat", "save_checkpoint", "latest_checkpoint",
           "checkpoint_dir", "stop_requested"]

TRAINING_ROLE = "trainer"
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Context:
    """Who this process is, as the launcher told it (torchrun's variables plus rtrain's)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    role: str
    attempt: int
    run_dir: pathlib.Path
    config: Optional[pathlib.Path]
    resume_from: Optional[pathlib.Path]
    launched: bool

    @property
    def is_reporter(self) -> bool:
        """Rank 0 of the training role: the process whose steps the launcher records."""
        return self.launched and self.role == TRAINING_ROLE and self.rank == 0


def context() -> Context:
    env = os.environ
    launched = "RTRAIN_HTTP" in env and "RTRAIN_JOB_TOKEN" in env
    path = lambda name: pathlib.Path(env[name]) if env.get(name) else None
    return Context(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        role=env.get("RTRAIN_ROLE", env.get("ROLE_NAME", TRAINING_ROLE)),
        attempt=int(env.get("RTRAIN_ATTEMPT", 0)),
        run_dir=path("RTRAIN_RUN_DIR") or pathlib.Path("."),
        config=path("RTRAIN_CONFIG"),
        resume_from=path("RTRAIN_RESUME_FROM"),
        launched=launched,
    )


def config() -> dict:
    """The run's effective config (its TOML as a dict; `[user]` holds the script's own settings),
    or an empty dict outside rtrain. Needs Python 3.11 (tomllib)."""
    path = context().config
    if path is None or not path.exists():
        return {}
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def _post(route: str, body: dict) -> None:
    ctx = context()
    body = {"role": ctx.role, "rank": ctx.rank, "attempt": ctx.attempt, **body}
    request = urllib.request.Request(
        f"http://{os.environ['RTRAIN_HTTP']}{route}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-rtrain-token": os.environ["RTRAIN_JOB_TOKEN"]},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"rtrain {route}: {e.code} {e.read().decode(errors='replace')}") from None


_last_report: Optional[float] = None
_last_step = 0


_stop = {"installed": False, "asked": False}


def stop_requested() -> bool:
    """Whether the launch has asked this process to stop (SIGTERM). The first call installs the
    handler that catches the signal, so call it once before the training loop; from then on
    SIGTERM no longer ends the process at once, and the script must check this and exit."""
    if not _stop["installed"]:
        import signal

        def _asked(signum, frame):
            _stop["asked"] = True

        signal.signal(signal.SIGTERM, _asked)
        _stop["installed"] = True
    return _stop["asked"]


def heartbeat() -> None:
    """Tells the launcher this process is alive, within a long phase between reports (an
    evaluation, a large checkpoint): once a process has reported, silence for
    `fault.heartbeat_timeout_s` means it is hung."""
    if context().launched:
        _post("/v1/heartbeat", {"step": _last_step})


def report(step: int, loss: Optional[float] = None, **metrics: float) -> None:
    """Reports that optimizer step `step` (counting from 1) is done, with its loss and any other
    numbers. `lr`, `tokens` (tokens or samples the step processed, for throughput) and `grad_norm`
    have their own columns; the rest go to metrics.jsonl under their names. Only rank 0 of the
    training role records steps (a report with a loss); rank 0 of any role records its metrics;
    every report is a heartbeat.
    A loss or metric that is NaN or infinite raises FloatingPointError: training diverged."""
    global _last_report, _last_step
    ctx = context()
    now = time.monotonic()
    step_time = now - _last_report if _last_report is not None else 0.0
    _last_report = now
    _last_step = int(step)
    numbers = {k: float(v) for k, v in metrics.items()}
    bad = [(k, v) for k, v in [("loss", loss), *numbers.items()] if v is not None and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"step {step}: {bad[0][0]} is {bad[0][1]}: training diverged")
    if not ctx.launched:
        return
    if ctx.is_reporter and loss is not None:
        body = {"step": int(step), "loss": float(loss), "step_time_s": step_time, "metrics": {}}
        for key in ("lr", "tokens", "grad_norm"):
            if key in numbers:
                body[key] = numbers.pop(key)
        body["metrics"] = numbers
        _post("/v1/step", body)  # also a heartbeat
        return
    _post("/v1/heartbeat", {"step": int(step)})
    if numbers and ctx.rank == 0:
        _post("/v1/metrics", {"step": int(step), "metrics": numbers})


def _checkpoints() -> pathlib.Path:
    return context().run_dir / "checkpoints"


def checkpoint_dir(step: int) -> pathlib.Path:
    """Where the checkpoint of `step` is published."""
    return _checkpoints() / f"step-{step:06d}"


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _keep_last() -> int:
    try:
        return int(config().get("checkpoint", {}).get("keep_last", 3))
    except ImportError:  # Python < 3.11 has no tomllib: keep the default
        return 3


@contextlib.contextmanager
def save_checkpoint(step: int) -> Iterator[Optional[pathlib.Path]]:
    """Yields a fresh directory to write the checkpoint of `step` into (rank 0 of the training
    role; other processes get None). When the block ends without an error the files are synced, listed in MANIFEST.json and
    published as checkpoints/step-NNNNNN in one rename; after an error nothing is published."""
    ctx = context()
    if ctx.rank != 0 or ctx.role != TRAINING_ROLE:
        yield None
        return
    root = _checkpoints()
    root.mkdir(parents=True, exist_ok=True)
    # Writes that a killed process left half done.
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        files = []
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files.append({"name": str(path.relative_to(tmp)), "bytes": path.stat().st_size, "sha256": _sha256(path)})
            heartbeat()  # hashing a large checkpoint takes a while
        config_text = ctx.config.read_text() if ctx.config and ctx.config.exists() else ""
        manifest = {"format": MANIFEST_FORMAT, "step": int(step), "created_unix": time.time(), "files": files,
                    "config_digest": hashlib.sha256(config_text.encode()).hexdigest(), "config": config_text}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = checkpoint_dir(step)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keep = _keep_last()
    if keep > 0:
        for old in _published()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _published() -> list:
    root = _checkpoints()
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def _verifies(path: pathlib.Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            return False
        return all((path / f["name"]).stat().st_size == f["bytes"] and _sha256(path / f["name"]) == f["sha256"]
                   for f in manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_checkpoint() -> Optional[pathlib.Path]:
    """The newest published checkpoint whose files match its manifest (a damaged newer one is
    skipped), or None."""
    for path in reversed(_published()):
        if _verifies(path):
            return path
    return None
