"""Peak RSS of one default-matrix worker running its largest passive training group (k = 1, no defense:
every passive attack under every threat), in one process, as a `splitleak run` worker does."""
import resource
import sys
import time

import torch

torch.set_num_threads(1)
from suite.experiment.config import DEFAULT_MATRIX, load_config  # noqa: E402  (after the thread count is set)
from suite.experiment.plan import expand  # noqa: E402
from suite.experiment.run import run_group  # noqa: E402

k = int(sys.argv[1]) if len(sys.argv) > 1 else 1
cfg = load_config(DEFAULT_MATRIX)
cells, _ = expand(cfg)
groups = {}
for c in cells:
    groups.setdefault(c.training_group(), []).append(c)
group = max((cs for cs in groups.values() if cs[0].head_blocks == k and cs[0].defense == "none"), key=len)
rows = []
t = time.time()
run_group(cfg, group, [str(i) for i in range(len(group))], None, sink=rows.append)
print(f"cells {len(rows)} ok {sum(r['status'] == 'ok' for r in rows)} in {time.time() - t:.0f} s; "
      f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
for r in rows:
    print(r["threat"], r["attack"], r["status"], r.get("attack_peak_rss_mib"), (r.get("error") or "")[:100])
