"""Cost of the replay-proof handshake: this tree's suite.engine.channel against an older channel.py without the
server challenge (path given on the command line, e.g. one written by ``git show f64fc2f:suite/channel.py``),
both ends of one handshake, measured interleaved in one process. Prints medians and their ratio.

    git show f64fc2f:suite/channel.py > /tmp/old_channel.py
    PYTHONPATH=. python .ci/handshake_cost.py /tmp/old_channel.py
"""

import importlib.util
import statistics
import sys
import time

from suite.engine import channel as new


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_channel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_channel"] = module
    spec.loader.exec_module(module)
    return module


def main(old_path: str) -> None:
    old = _load(old_path)
    for mode, reps in (("x25519", 300), ("rsa", 40)):
        servers = new.ServerEnd(new.ServerKeys(mode)), old.ServerEnd(old.ServerKeys(mode))
        times: dict[str, list[float]] = {"new": [], "old": []}
        for _ in range(reps):
            start = time.perf_counter()
            client = new.ClientEnd("client/0", servers[0].public_for("client/0"))
            servers[0].accept("client/0", client.handshake)
            times["new"].append(time.perf_counter() - start)
            start = time.perf_counter()
            client = old.ClientEnd("client/0", servers[1].keys.public())
            servers[1].accept("client/0", client.handshake)
            times["old"].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{mode}: one handshake, both ends, median of {reps}: with challenge {med['new']:.3f} ms, "
              f"without {med['old']:.3f} ms, ratio {med['new'] / med['old']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1])
