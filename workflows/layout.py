"""What the jobs leave in a job's OUT, each name said once (the stages' own folders are named
in preprocess/layout.py, preprocess/versions.py, features/layout.py and train/layout.py).

    tessera run:      OUT/shards/                 the shard folder (+ sidecars, embed-cache/)
                      OUT/train/<data digest>/    one training run per data version
                      OUT/run-summary.json        the stages' summaries
                      OUT/report.html             plots of the data, the stages, training
    tessera refresh:  OUT/versions/vNNNNNN/       a version (+ train/: its training run)
                      OUT/embed-cache/            shared by every version
                      OUT/refresh/state.json      the manifest and row identities the last refresh saw
                      OUT/refresh/identities-*/   those identities (Parquet, one part per chunk)
    every folder a command writes: FOLDER/lease.json (core/lease.py)
                      FOLDER/logs/<UTC time>-<command>/  its driver log and workers' output (core/runtime.py)
    a run folder:     RUN/report.html             its training and evaluation plots"""

from __future__ import annotations

SHARDS = "shards"
TRAIN = "train"  # under OUT (one run per data digest) and under each version (its run)
RUN_SUMMARY = "run-summary.json"
REPORT = "report.html"
STATE = "refresh/state.json"
IDENTITIES = "refresh/identities-"  # + a random id
