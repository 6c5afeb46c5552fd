"""Open qscript's TensorBoard event files with the `tensorboard` package itself.

    python3 bench/tensorboard_read.py RUN_DIR

Prints `TAG COUNT first=.. last=..` per scalar tag (exit 0); exit 3 when `tensorboard` is not
installed (tests/notebook.rs then skips this check), 1 when the files cannot be read.
"""
import sys

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    print("tensorboard is not installed (pip install tensorboard)")
    sys.exit(3)

acc = EventAccumulator(sys.argv[1])
acc.Reload()
tags = acc.Tags()["scalars"]
if not tags:
    print("no scalars in", sys.argv[1])
    sys.exit(1)
for tag in sorted(tags):
    ev = acc.Scalars(tag)
    print(f"{tag} {len(ev)} first={ev[0].value:.6g}@{ev[0].step} last={ev[-1].value:.6g}@{ev[-1].step}")
