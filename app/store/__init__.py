"""Every query Jobdock makes. Routes and the pool call these; they hold no SQL themselves.

`app.store` itself is the jobs module (create, get, list, claim, heartbeat, finish,
rescue, purge), the counts of `app.store.stats` and the grouped submissions of
`app.store.submit`; `app.store.logs` holds the log chunks and `app.store.webhooks` the
callback deliveries.
"""

from app.store.jobs import *  # noqa: F403
from app.store.stats import JobCounts as JobCounts
from app.store.stats import count_jobs as count_jobs
from app.store.submit import QueueRoom as QueueRoom
from app.store.submit import SubmissionWriter as SubmissionWriter
from app.store.submit import queue_job as queue_job
