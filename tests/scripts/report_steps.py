"""A training script of the user's in plain Python (no torch), run by tests/python_helper.rs:
counts steps, reports them with rtrain.report, checkpoints with rtrain.save_checkpoint every
`[user] every` steps and resumes from rtrain.latest_checkpoint. The ranks go in lockstep, as a
collective would make them: each waits for the others to finish a step before the next (through
files in the run directory), so a stopped rank stalls the gang. Asked to stop (SIGTERM, caught
through rtrain.stop_requested), it saves the step it is at and exits.
"""
import json
import os
import time

import rtrain

ctx = rtrain.context()
rtrain.stop_requested()
config = rtrain.config()
steps, every, pause = config["train"]["steps"], config["user"]["every"], config["user"]["pause_s"]
start, total = 0, 0.0
ckpt = rtrain.latest_checkpoint()
if ckpt is not None:
    state = json.loads((ckpt / "state.json").read_text())
    start, total = state["step"], state["total"]
    print(f"rank {ctx.rank} resumed from step {start} (attempt {ctx.attempt})", flush=True)
print(f"rank {ctx.rank} of {ctx.world_size} starting at step {start}", flush=True)
print(f"EXAMPLE_NOTE={os.environ.get('EXAMPLE_NOTE')}", flush=True)
lockstep = ctx.run_dir / "lockstep" / f"attempt-{ctx.attempt}"
lockstep.mkdir(parents=True, exist_ok=True)


def wait_for_peers(step):
    """Waits until every rank has reached `step`; False when a peer stopped on request instead
    (it left the `stop` mark after the previous step)."""
    (lockstep / f"{ctx.rank}.tmp").write_text(str(step))
    (lockstep / f"{ctx.rank}.tmp").replace(lockstep / str(ctx.rank))
    for peer in range(ctx.world_size):
        while True:
            try:
                if int((lockstep / str(peer)).read_text()) >= step:
                    break
            except (OSError, ValueError):
                pass
            if (lockstep / "stop").exists():
                return False
            time.sleep(0.005)
    return True


def save(step):
    with rtrain.save_checkpoint(step) as d:
        if d is not None:
            (d / "state.json").write_text(json.dumps({"step": step, "total": total}))


def stop(step):
    """Every rank stops after the same step: the first asked marks it, the others follow."""
    (lockstep / "stop").write_text(str(step))
    save(step)
    print(f"rank {ctx.rank} stopped on request at step {step}", flush=True)
    raise SystemExit(0)


for step in range(start + 1, steps + 1):
    time.sleep(pause)
    if not wait_for_peers(step):
        stop(step - 1)
    total += step
    rtrain.report(step, loss=1.0 / step, lr=0.1, tokens=100, running_total=total)
    if rtrain.stop_requested():
        stop(step)
    if step % every == 0:
        save(step)
print(f"rank {ctx.rank} done, total {total}", flush=True)
