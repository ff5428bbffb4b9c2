"""Issue 5's reference workload, shared by overhead.py and flower_peer.py: overrides of
configs/tiny.yaml. A module of its own, with no imports, so that a side timed from its process's
start does not pay for the other benchmark's imports (torch) before it starts."""

WORKLOAD = [
    "data.partition=iid",
    "data.max_rows=0",
    "data.max_length=64",
    "clients.per_round=10",
    "train.local_steps=10",
    "train.batch_size=16",
    "train.optimizer=sgd",
    "train.lr=0.05",
    "eval.every=1000000",
    "eval.aggregation_error=false",
    "worker.count=2",
    "worker.num_cpus=1",
]
