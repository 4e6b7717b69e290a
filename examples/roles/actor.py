"""An actor of the roles demo (configs/roles_demo.toml): makes samples of a linear function and
streams them to every rank of the trainer gang, which it finds through the job's address book.

It uses nothing but the Python standard library and the coordinator's HTTP/JSON endpoint, whose
address and token rtrain puts in the environment (RTRAIN_HTTP, RTRAIN_JOB_TOKEN), with who this
process is (RTRAIN_ROLE, ROLE_RANK, RTRAIN_ATTEMPT). Events for it (for example "restarted" when
the trainer gang comes back from a failure) arrive on a stream of JSON lines and are logged.
"""

import json
import os
import random
import socket
import sys
import threading
import time
import tomllib
import urllib.request

HTTP = os.environ["RTRAIN_HTTP"]
TOKEN = os.environ["RTRAIN_JOB_TOKEN"]
ME = {"role": os.environ["RTRAIN_ROLE"], "rank": int(os.environ["ROLE_RANK"]), "attempt": int(os.environ["RTRAIN_ATTEMPT"])}


def call(path, body=None, timeout=10):
    """One request to the coordinator; the reply as JSON."""
    data = None if body is None else json.dumps({**ME, **body}).encode()
    req = urllib.request.Request(f"http://{HTTP}{path}", data=data, headers={"x-rtrain-token": TOKEN, "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return json.loads(reply.read() or b"{}")


def trainer_addresses():
    """The trainer ranks' "data" addresses, once every rank of the gang has published one."""
    while True:
        book = call("/v1/addresses?role=trainer")
        addrs = [e["addrs"].get("data") for e in sorted(book["endpoints"], key=lambda e: e["rank"])]
        if addrs and all(addrs):
            return book["version"], addrs
        time.sleep(0.1)


def log_events():
    """Prints every command or event for this process, as it arrives."""
    query = f"/v1/commands?role={ME['role']}&rank={ME['rank']}&attempt={ME['attempt']}"
    req = urllib.request.Request(f"http://{HTTP}{query}", headers={"x-rtrain-token": TOKEN})
    with urllib.request.urlopen(req) as stream:
        for line in stream:
            print(f"event {line.decode().strip()}", flush=True)


def heartbeat(progress):
    """Tells the coordinator this process is alive; one that falls silent is restarted."""
    while True:
        call("/v1/heartbeat", {"step": progress["sent"]})
        time.sleep(1.0)


def main():
    with open(os.environ["RTRAIN_CONFIG"], "rb") as f:
        user = tomllib.load(f).get("user", {})
    features = int(user.get("features", 8))
    noise = float(user.get("noise", 0.01))
    weights = [(i + 1) / features for i in range(features)]
    rng = random.Random(1000 + ME["rank"] * 7919 + ME["attempt"])
    progress = {"sent": 0}
    threading.Thread(target=log_events, daemon=True).start()
    threading.Thread(target=heartbeat, args=(progress,), daemon=True).start()
    print(f"actor {ME['rank']} (attempt {ME['attempt']}) looking for the trainer", flush=True)

    sent, last_report = 0, 0.0
    while True:
        version, addrs = trainer_addresses()
        print(f"address book version {version}: trainer at {addrs}", flush=True)
        try:
            links = [socket.create_connection(tuple(a.rsplit(":", 1)), timeout=10) for a in addrs]
            while True:
                for link in links:
                    lines = []
                    for _ in range(32):
                        x = [rng.uniform(-1, 1) for _ in range(features)]
                        y = sum(w * v for w, v in zip(weights, x)) + rng.gauss(0, noise)
                        lines.append(json.dumps({"x": x, "y": y}))
                    link.sendall(("\n".join(lines) + "\n").encode())
                    sent += len(lines)
                    progress["sent"] = sent
                now = time.monotonic()
                if now - last_report >= 1.0:
                    call("/v1/metrics", {"step": sent, "metrics": {"samples_per_s": sent / max(now - START, 1e-9)}})
                    last_report = now
        except OSError as e:
            # The trainer gang restarted (its ranks moved) or is gone: look it up again.
            print(f"lost the trainer ({e}); looking it up again", flush=True)
            time.sleep(0.2)


START = time.monotonic()
if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
