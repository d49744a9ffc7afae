"""What the injector asks of the Kubernetes API: the server's version, once at start (native sidecars or plain
containers), and Events about pods whose annotations it refuses.

Both go through proxy/kube/ (the process's one ApiClient, calls in worker threads). /version needs no RBAC: every
client may read it (the built-in system:public-info-viewer ClusterRole). Events need `create` and `patch` on
events in the pods' namespaces; they go through the proxy's EventRecorder, so they are aggregated (a controller
retrying a refused pod patches one Event's count) and rate limited per object and reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

import kubernetes.client as k8s

from proxy.clock import Clock
from proxy.config.settings import Kubernetes
from proxy.injector.mutate import Decision, supports_native_sidecars
from proxy.kube.client import KubeApi, api_error, backoff_delay, call
from proxy.kube.events import EventRecorder
from proxy.logs import event

log = logging.getLogger("aml_auth_proxy.injector")

REASON = "AmlAuthProxyNotInjected"  # the Event's reason
VERSION_TIMEOUT = (5.0, 10.0)  # connect, read


def kube_api(environ: Mapping[str, str] = os.environ) -> KubeApi:
    """The API client: in-cluster (the injector's service account), else KUBECONFIG."""
    settings = Kubernetes(
        pod_name=environ.get("POD_NAME") or None,
        pod_namespace=environ.get("POD_NAMESPACE") or None,
        incluster_environ={
            k: environ[k] for k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT") if k in environ
        },
        kubeconfig_env=environ.get("KUBECONFIG") or None,
    )
    return KubeApi(settings)


def _version(api: KubeApi) -> tuple[str, bool]:
    info = k8s.VersionApi(api.api_client()).get_code(_request_timeout=VERSION_TIMEOUT)
    git = str(info.git_version or f"v{info.major}.{info.minor}")
    return git, supports_native_sidecars(str(info.git_version or ""), str(info.major or ""), str(info.minor or ""))


async def ask_native(
    api: KubeApi,
    *,
    initial: float = 0.5,
    maximum: float = 30.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """Whether the API server runs native sidecars (1.29+), asked until it answers (with capped, jittered backoff;
    a failure is logged once per distinct reason)."""
    attempt, last = 0, ""
    while True:
        attempt += 1
        try:
            version, native = await call(_version, api)
        except Exception as exc:
            reason = api_error(exc, verb="get", what="the API server's /version").reason
            if isinstance(exc, ValueError):
                reason = str(exc)
            if reason != last:
                last = reason
                event(log, logging.WARNING, "kubernetes_version_failed", reason=reason, attempt=attempt)
            await sleep(backoff_delay(attempt, initial=initial, maximum=maximum))
            continue
        mode = "native" if native else "plain"
        event(log, logging.INFO, "kubernetes_version", version=version, sidecar=mode)
        return native


def recorder(api: KubeApi, *, clock: Clock, count: Callable[[str, str], None]) -> EventRecorder:
    """The Event sender; Events about other objects name the injector's pod as reportingInstance."""
    s = api.settings
    return EventRecorder(
        api=api,
        pod_name=s.pod_name or "aml-auth-proxy-injector",
        namespace=s.pod_namespace or "default",
        clock=clock,
        count=count,
    )


def report(events: EventRecorder, decision: Decision, *, deny_invalid: bool) -> None:
    """An Event about a pod whose annotations were refused (never for a dry run: the webhook declares
    sideEffects NoneOnDryRun)."""
    subject = decision.subject
    if decision.outcome != "denied" or subject is None or decision.dry_run:
        return
    consequence = "the pod is refused (failurePolicy Fail)" if deny_invalid else "the pod starts without it"
    message = f"aml-auth-proxy was not injected into pod {decision.pod}: {'; '.join(decision.problems)}; {consequence}"
    events.emit(warning=True, reason=REASON, message=message, about=subject)
