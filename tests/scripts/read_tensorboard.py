"""Reads a run's TensorBoard events with TensorBoard's own reader and prints every scalar series
as JSON ({tag: [[step, value], ...]}), for tests/tensorboard.rs.

    python3 tests/scripts/read_tensorboard.py RUN/tensorboard     (needs the tensorboard package)
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
