"""Pull mode (`serve --follow`): the device keeps a served model at the version a registry alias names.

Read in this order: `follow.py` (a thread per followed name: when to check, what changed, its
status), `install.py` (where a pulled version is verified: download, checks, smoke inference,
install), `download.py` (MLmodel and the files it names), `smoke.py` (the child's load and
inference), `report.py` (the device-state tag), `registry_client.py` (the tracking server's REST
API, bounded), `deadline_http.py` (a request's total deadline and the follower's stop).
"""
