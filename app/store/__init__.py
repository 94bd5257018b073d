"""Every query Jobdock makes. Routes and the pool call these; they hold no SQL themselves.

`app.store` itself is the jobs module (create, get, list, claim, heartbeat, finish,
rescue, purge); `app.store.logs` holds the log chunks and `app.store.webhooks` the
callback deliveries.
"""

from app.store.jobs import *  # noqa: F403
