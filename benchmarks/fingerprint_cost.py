"""What the data fingerprint a checkpoint records costs, against loading the data it hashes.

A checkpoint records a SHA-256 of the four loaded arrays (``meta["data_fingerprint"]``), computed
once per run start; this measures that hash next to the load it follows. Prints one JSON line
(``load_s``, ``fingerprint_s``, ``megabytes``):

    python ../shared/data/prepare_cifar.py /tmp/c10       # once, ~15 s: the CIFAR-10 folder
    python benchmarks/fingerprint_cost.py /tmp/c10
"""

from __future__ import annotations

import argparse
import json
import time

from las_env.checkpoint import data_fingerprint
from las_env.datasets import load_dataset


def main() -> None:
    """Load the data set from the folder given, hash it, and print both times."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="the folder holding the data set (for cifar10: DIR/cifar-10-batches-py)")
    p.add_argument("--data", default="cifar10", help="the registered data set to load (default cifar10)")
    args = p.parse_args()
    t0 = time.perf_counter()
    d = load_dataset(args.data, args.root, download=False)
    t1 = time.perf_counter()
    data_fingerprint(d.x_train, d.y_train, d.x_test, d.y_test)
    t2 = time.perf_counter()
    size = sum(t.numel() * t.element_size() for t in (d.x_train, d.y_train, d.x_test, d.y_test)) / 1e6
    print(json.dumps({"data": args.data, "load_s": round(t1 - t0, 3), "fingerprint_s": round(t2 - t1, 3),
                      "megabytes": round(size, 1)}))


if __name__ == "__main__":
    main()
