"""The inference workers: score the asynchronous jobs' chunks queued per tenant.

`python -m services.worker` is stateless: it needs the database (DATABASE_URL, as
`mlops_worker`) and the registry, reads the request queues its role is granted, scores with
the predictor's scorer and model resolution, writes the results and acknowledges, in one
transaction per chunk. Any number of them may run, on any host that reaches the database.
"""
