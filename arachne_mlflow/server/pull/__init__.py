"""Pull mode (`serve --follow`): the device keeps a served model at the version a registry alias names.

Read in this order: `follow.py` (a thread per followed name: when to check, what changed, its
status), `install.py` (where a pulled version is verified: download, checks, smoke inference,
install), `download.py` (MLmodel and the files it names), `smoke.py` (the child's load and
inference), `report.py` (this device's own state record), `registry_client.py` (the tracking
server's REST API, bounded), `answers.py` (its answers, type-checked), `bodies.py` (their bodies, read
within bounds), `tracking_env.py` (the server's address, credentials, TLS and trusted artifact hosts
from the environment), `deadline_http.py` (a request's total deadline and the follower's stop).
"""
