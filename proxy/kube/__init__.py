"""The proxy's Kubernetes API use: the client and its threads (client.py), Secret watches (secrets.py), Events
(events.py). Nothing outside this package imports `kubernetes`."""
