"""The sidecar injector (`aml-auth-proxy injector`): a mutating admission webhook that adds the proxy to pods
labelled `aml-auth-proxy.io/inject: "true"`.

`mutate.py` decides (pure functions: an AdmissionReview in, an AdmissionReview out), `server.py` serves it over
HTTPS with its health, readiness and metrics, `cluster.py` asks the API server's version and writes Events, and
`main.py` runs the process. The container it adds is the Helm chart's own sidecar template, rendered by the chart
into a file (`--sidecar-template`): one source for both.
"""

CERT_POLL_SECONDS = 5.0  # how often the certificate files are checked (here: the CLI reads it without aiohttp)
