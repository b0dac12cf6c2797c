"""Load tests and protocol replay against a running bsce-serve server (HTTP only).

- ``python -m loadtest.replay``: a class-incremental protocol driven through /learn and
  /predict, reported as ``learner.bench`` reports an offline run.
- ``loadtest/locustfile.py`` + ``python -m loadtest.run``: Locust prediction traffic (single
  and batched) with an optional updater that posts new classes.
- ``python -m loadtest.swap_under_load``: prediction latency while model versions land.
"""
