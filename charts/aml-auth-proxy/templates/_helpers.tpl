{{/*
Helpers for aml-auth-proxy. Every helper takes this chart's context: the root context `.` inside this chart, or
`(index .Subcharts "aml-auth-proxy")` from a parent chart that has this chart as a dependency.
*/}}

{{/* Chart name, shortened to 63 characters. */}}
{{- define "aml-auth-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart name> (or the release name when it already contains the chart name). */}}
{{- define "aml-auth-proxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version for the helm.sh/chart label. */}}
{{- define "aml-auth-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "aml-auth-proxy.labels" -}}
helm.sh/chart: {{ include "aml-auth-proxy.chart" . }}
{{ include "aml-auth-proxy.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aml-auth-proxy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the standalone Deployment, its Service and its PodDisruptionBudget. */}}
{{- define "aml-auth-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aml-auth-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The label every pod running this release's proxy carries, standalone or as a sidecar in your own pods. The
metrics Service, the PodMonitor and the NetworkPolicy select on it.
*/}}
{{- define "aml-auth-proxy.proxySelectorLabels" -}}
aml-auth-proxy/instance: {{ include "aml-auth-proxy.fullname" . }}
{{- end }}

{{/*
Labels for a pod that runs the proxy (add them to your own pod template in sidecar mode): the proxy's own
label and workload identity's, nothing else. Never app.kubernetes.io/name or commonLabels: the pod is your app's,
and its name and labels stay yours ("aml-auth-proxy.labels" and ".selectorLabels" are for the chart's objects).
*/}}
{{- define "aml-auth-proxy.podLabels" -}}
{{ include "aml-auth-proxy.proxySelectorLabels" . }}
{{- if .Values.workloadIdentity.enabled }}
azure.workload.identity/use: "true"
{{- end }}
{{- end }}

{{/* Annotations for a pod that runs the proxy: the pod rolls when the proxy config changes. */}}
{{- define "aml-auth-proxy.podAnnotations" -}}
checksum/config: {{ include "aml-auth-proxy.configData" . | sha256sum }}
{{- end }}

{{- define "aml-auth-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "aml-auth-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "aml-auth-proxy.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "aml-auth-proxy.configMapName" -}}
{{- printf "%s-config" (include "aml-auth-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "aml-auth-proxy.metricsServiceName" -}}
{{- printf "%s-metrics" (include "aml-auth-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret mounted at secrets.mountPath, or "" when there is none. */}}
{{- define "aml-auth-proxy.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if .Values.secrets.create }}
{{- printf "%s-secrets" (include "aml-auth-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* "true" when the proxy runs as a native sidecar (an init container with restartPolicy: Always), else "false". */}}
{{- define "aml-auth-proxy.native" -}}
{{- $mode := toString .Values.sidecar.native }}
{{- $kube := .Capabilities.KubeVersion.Version }}
{{- if eq $mode "true" }}
{{- if not (semverCompare ">=1.28.0-0" $kube) }}
{{- fail (printf "sidecar.native is true but the cluster is Kubernetes %s: native sidecars need 1.28 or newer (1.29 enables them by default); use sidecar.native: auto or false" $kube) }}
{{- end }}
{{- "true" }}
{{- else if eq $mode "false" }}
{{- "false" }}
{{- else if semverCompare ">=1.29.0-0" $kube }}
{{- "true" }}
{{- else }}
{{- "false" }}
{{- end }}
{{- end }}

{{/*
What the proxy asks of the Kubernetes API, collected from the values, as JSON (use with fromJson):
  watchedSecrets  Secrets read through the API: the routes' auth.primary_secret_ref, auth.secondary_secret_ref
                  and auth.identity.client_secret_ref names, plus rbac.extraSecretNames (sorted, unique)
  leases          the routes' share.lease names
  sharedSecrets   the Secrets those routes share their token through (share.secret, default <share.lease>-token)
  events          events.enabled
  podEnv          POD_NAME and POD_NAMESPACE are needed (Events name the pod; a Lease holder is the pod)
  apiToken        the pod mounts the service account token (a feature above, or serviceAccount.automountToken)
*/}}
{{- define "aml-auth-proxy.kubeFeatures" -}}
{{- $v := .Values }}
{{- $watched := list }}
{{- $leases := list }}
{{- $shared := list }}
{{- range $route := $v.config.routes }}
{{- if kindIs "map" $route }}
{{- $auth := index $route "auth" | default dict }}
{{- if kindIs "map" $auth }}
{{- $refs := list (index $auth "primary_secret_ref") (index $auth "secondary_secret_ref") }}
{{- $identity := index $auth "identity" }}
{{- if kindIs "map" $identity }}{{ $refs = append $refs (index $identity "client_secret_ref") }}{{ end }}
{{- range $ref := $refs }}
{{- if and (kindIs "map" $ref) (kindIs "string" (index $ref "name")) (index $ref "name") }}
{{- $watched = append $watched (index $ref "name") }}
{{- end }}
{{- end }}
{{- end }}
{{- $share := index $route "share" }}
{{- if and (kindIs "map" $share) (kindIs "string" (index $share "lease")) (index $share "lease") }}
{{- $leases = append $leases $share.lease }}
{{- $shared = append $shared (index $share "secret" | default (printf "%s-token" $share.lease)) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $v.rbac.extraSecretNames }}{{ $watched = append $watched . }}{{ end }}
{{- $events := $v.events.enabled }}
{{- $podEnv := or $events (gt (len $leases) 0) }}
{{- $apiToken := or $events (gt (len $watched) 0) (gt (len $leases) 0) $v.serviceAccount.automountToken }}
{{- dict "watchedSecrets" ($watched | uniq | sortAlpha) "leases" ($leases | uniq | sortAlpha) "sharedSecrets" ($shared | uniq | sortAlpha) "events" $events "podEnv" $podEnv "apiToken" $apiToken | toJson }}
{{- end }}

{{/*
automountServiceAccountToken for a pod that runs the proxy: "true" when a feature needs the Kubernetes API (Secret
watch, Events, a shared token) or serviceAccount.automountToken is set, else "false".
*/}}
{{- define "aml-auth-proxy.automountServiceAccountToken" -}}
{{- (include "aml-auth-proxy.kubeFeatures" . | fromJson).apiToken | toString }}
{{- end }}

{{/*
The proxy's config file (docs/configuration.md): every key of `config` (values.schema.json admits only the
proxy's own), with kubernetes.events from events.enabled and workers from "aml-auth-proxy.workers". Numbers go
through toYaml so they never print as 1e+06.
*/}}
{{- define "aml-auth-proxy.configFile" -}}
{{- $c := .Values.config }}
{{- $kube := deepCopy ($c.kubernetes | default dict) }}
{{- $_ := set $kube "events" .Values.events.enabled }}
{{- $doc := omit $c "kubernetes" }}
{{- $_ := set $doc "kubernetes" $kube }}
{{- $_ := set $doc "workers" (include "aml-auth-proxy.workers" . | int) -}}
# aml-auth-proxy config, rendered by the Helm chart from `config` (docs/configuration.md).
{{ toYaml $doc }}
{{- end }}

{{/*
A Kubernetes quantity as a plain number in its base unit, to compare two of them: "96Mi" -> 100663296 (bytes),
"500m" -> 0.5 (cores), 2 -> 2. Takes (dict "value" V "key" "resources.limits.memory") and fails naming the key
when V is not a quantity. Suffixes: Ki Mi Gi Ti Pi Ei (powers of 1024), k M G T P E (powers of 1000), m (1/1000),
or a decimal exponent (129e6).
*/}}
{{- define "aml-auth-proxy.quantity" -}}
{{- $q := toString .value | trim }}
{{- $re := "^([0-9]+(?:[.][0-9]*)?|[.][0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|[eE][-+]?[0-9]+)?$" }}
{{- if not (regexMatch $re $q) }}
{{- fail (printf "%s (%s) is not a Kubernetes quantity: write it as 256Mi, 1Gi, 500m or 2" .key (toString .value | quote)) }}
{{- end }}
{{- $n := regexReplaceAll $re $q "${1}" | float64 }}
{{- $suffix := regexReplaceAll $re $q "${2}" }}
{{- $binary := dict "Ki" 1 "Mi" 2 "Gi" 3 "Ti" 4 "Pi" 5 "Ei" 6 }}
{{- $decimal := dict "k" 1 "M" 2 "G" 3 "T" 4 "P" 5 "E" 6 }}
{{- if hasKey $binary $suffix }}
{{- range until (index $binary $suffix) }}{{ $n = mulf $n 1024 }}{{ end }}
{{- else if hasKey $decimal $suffix }}
{{- range until (index $decimal $suffix) }}{{ $n = mulf $n 1000 }}{{ end }}
{{- else if eq $suffix "m" }}
{{- $n = divf $n 1000 }}
{{- else if $suffix }}
{{- $exp := substr 1 -1 $suffix }}
{{- range until (atoi (trimPrefix "+" (trimPrefix "-" $exp))) }}
{{- if hasPrefix "-" $exp }}{{ $n = divf $n 10 }}{{ else }}{{ $n = mulf $n 10 }}{{ end }}
{{- end }}
{{- end }}
{{- printf "%f" $n }}
{{- end }}

{{/*
`workers` of the rendered config: config.workers when the user set a number above 0; otherwise (unset, or 0 =
auto) the CPU limit in cores rounded up (500m: 1, 1500m: 2), at least 1, at most 256; 1 without a CPU limit.
The proxy's own auto would start one process per CPU of the node when there is no CPU limit, each 34-55 MiB,
all under one memory limit.
*/}}
{{- define "aml-auth-proxy.workers" -}}
{{- $set := int (.Values.config.workers | default 0) }}
{{- $cpu := index ((.Values.resources | default dict).limits | default dict) "cpu" }}
{{- if gt $set 0 }}
{{- $set }}
{{- else if kindIs "invalid" $cpu }}
{{- 1 }}
{{- else }}
{{- $cores := include "aml-auth-proxy.quantity" (dict "value" $cpu "key" "resources.limits.cpu") | float64 }}
{{- min 256 (max 1 (int (ceil $cores))) }}
{{- end }}
{{- end }}

{{/* The ConfigMap's data; its sha256 is the checksum/config pod annotation. */}}
{{- define "aml-auth-proxy.configData" -}}
config.yaml: |
{{ include "aml-auth-proxy.configFile" . | indent 2 }}
{{- end }}

{{/* terminationGracePeriodSeconds: room for the app to drain, then for the proxy's own shutdown grace. */}}
{{- define "aml-auth-proxy.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.sidecar.preStopSeconds) (int (ceil .Values.config.shutdown_grace_seconds)) }}
{{- $set := .Values.standalone.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $set }}
{{- add $needed 10 }}
{{- else if le (int $set) (int $needed) }}
{{- fail (printf "standalone.terminationGracePeriodSeconds (%d) must be greater than sidecar.preStopSeconds + config.shutdown_grace_seconds (%d), or the proxy is killed while requests are in flight" (int $set) (int $needed)) }}
{{- else }}
{{- int $set }}
{{- end }}
{{- end }}

{{/*
The proxy container: ONE list item for `containers:` (plain mode) or `initContainers:` (native mode; see
"aml-auth-proxy.native"). Needs the volumes of "aml-auth-proxy.volumes" in the same pod.
*/}}
{{- define "aml-auth-proxy.sidecar" -}}
{{- include "aml-auth-proxy.validate" . }}
{{- $native := eq (include "aml-auth-proxy.native" .) "true" }}
{{- $kube := include "aml-auth-proxy.kubeFeatures" . | fromJson }}
{{- $adminPort := int .Values.config.admin.port -}}
- name: {{ .Values.sidecar.name }}
  image: {{ include "aml-auth-proxy.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if $native }}
  # A native sidecar: started (startup probe passed) before the app, stopped after it.
  restartPolicy: Always
  {{- end }}
  args: ["run", "--config", "/etc/aml-auth-proxy/config.yaml"]
  ports:
    - name: proxy-admin
      containerPort: {{ $adminPort }}
      protocol: TCP
  {{- if or $kube.podEnv .Values.sidecar.extraEnv }}
  env:
    {{- if $kube.podEnv }}
    # The downward API: Events name this pod, and a shared token's Lease holder is this pod.
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- end }}
    {{- with .Values.sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  startupProbe:
    httpGet:
      path: {{ .Values.probes.startup.path }}
      port: {{ $adminPort }}
    periodSeconds: {{ int .Values.probes.startup.periodSeconds }}
    timeoutSeconds: {{ int .Values.probes.startup.timeoutSeconds }}
    failureThreshold: {{ int .Values.probes.startup.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $adminPort }}
    initialDelaySeconds: {{ int .Values.probes.liveness.initialDelaySeconds }}
    periodSeconds: {{ int .Values.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ int .Values.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ int .Values.probes.liveness.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $adminPort }}
    initialDelaySeconds: {{ int .Values.probes.readiness.initialDelaySeconds }}
    periodSeconds: {{ int .Values.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ int .Values.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ int .Values.probes.readiness.failureThreshold }}
  {{- if not $native }}
  lifecycle:
    preStop:
      # Plain-container mode: keep serving while the app drains, then SIGTERM starts the proxy's own grace.
      exec:
        command: ["/bin/sh", "-c", "sleep {{ int .Values.sidecar.preStopSeconds }}"]
  {{- end }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: aml-auth-proxy-config
      mountPath: /etc/aml-auth-proxy
      readOnly: true
    {{- if include "aml-auth-proxy.secretName" . }}
    - name: aml-auth-proxy-secrets
      mountPath: {{ .Values.secrets.mountPath }}
      readOnly: true
    {{- end }}
    - name: aml-auth-proxy-tmp
      mountPath: /tmp
    {{- with .Values.sidecar.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The pod volumes the proxy container mounts (list items for `volumes:`). */}}
{{- define "aml-auth-proxy.volumes" -}}
- name: aml-auth-proxy-config
  configMap:
    name: {{ include "aml-auth-proxy.configMapName" . }}
{{- with include "aml-auth-proxy.secretName" . }}
- name: aml-auth-proxy-secrets
  secret:
    secretName: {{ . }}
    defaultMode: {{ int $.Values.secrets.defaultMode }}
    {{- with $.Values.secrets.items }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
- name: aml-auth-proxy-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/*
The admin port's ingress rule, one list item for a NetworkPolicy's `ingress:` (or nothing): from the release's
own `helm test` pod (helmTest.enabled with metrics.service.enabled; it asks /readyz through the metrics Service
from the release namespace) and from networkPolicy.ingress.adminFrom (the metrics scraper). Never a rule without
`from`, which would admit every peer. kubelet probes are not subject to NetworkPolicies. The chart's standalone
NetworkPolicy uses it; in sidecar mode, put it in your own policy for your pods (chart README).
*/}}
{{- define "aml-auth-proxy.networkPolicyIngress" -}}
{{- $from := list }}
{{- if and .Values.helmTest.enabled .Values.metrics.service.enabled }}
{{- $testPod := include "aml-auth-proxy.selectorLabels" . | fromYaml }}
{{- $_ := set $testPod "app.kubernetes.io/component" "test" }}
{{- $from = append $from (dict "podSelector" (dict "matchLabels" $testPod)) }}
{{- end }}
{{- $from = concat $from (.Values.networkPolicy.ingress.adminFrom | default list) }}
{{- if $from }}
- ports:
    - port: {{ int .Values.config.admin.port }}
      protocol: TCP
  from:
    {{- toYaml $from | nindent 4 }}
{{- end }}
{{- end }}

{{/*
The proxy's egress rules, list items for a NetworkPolicy's `egress:`: DNS (53, UDP and TCP) to
networkPolicy.egress.dnsTo, HTTPS (networkPolicy.egress.httpsPorts) to AML, Entra ID and ARM anywhere, the
Kubernetes API server (networkPolicy.egress.apiServer: ports, optional cidrs) when the pod uses the API (Secret
watch, Events, a shared token, or serviceAccount.automountToken: see "aml-auth-proxy.kubeFeatures"), and
networkPolicy.egress.extra as it is.
*/}}
{{- define "aml-auth-proxy.networkPolicyEgress" -}}
{{- $eg := .Values.networkPolicy.egress }}
{{- include "aml-auth-proxy.networkPolicyDns" . }}
{{- with $eg.httpsPorts }}
- ports:
    {{- range . }}
    - port: {{ int . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- if (include "aml-auth-proxy.kubeFeatures" . | fromJson).apiToken }}
{{- include "aml-auth-proxy.networkPolicyApiServer" . }}
{{- end }}
{{- with $eg.extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Egress to DNS (53, UDP and TCP) to networkPolicy.egress.dnsTo: a list item. */}}
{{- define "aml-auth-proxy.networkPolicyDns" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with .Values.networkPolicy.egress.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Egress to the Kubernetes API server (networkPolicy.egress.apiServer: ports, optional cidrs): a list item,
or nothing without ports. */}}
{{- define "aml-auth-proxy.networkPolicyApiServer" -}}
{{- $api := .Values.networkPolicy.egress.apiServer | default dict }}
{{- with $api.ports }}
- ports:
    {{- range . }}
    - port: {{ int . }}
      protocol: TCP
    {{- end }}
  {{- with $api.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Every `fail` on contradictory values, in one place. Renders nothing. */}}
{{- define "aml-auth-proxy.validate" -}}
{{- $v := .Values }}
{{- if and $v.secrets.existingSecret $v.secrets.create }}
{{- fail "secrets.existingSecret and secrets.create are both set: mount your own Secret or let the chart make one, not both" }}
{{- end }}
{{- if and $v.secrets.create (not $v.secrets.data) }}
{{- fail "secrets.create is true but secrets.data is empty: nothing to put in the Secret" }}
{{- end }}
{{- if and $v.secrets.data (not $v.secrets.create) }}
{{- fail "secrets.data is set but secrets.create is false: the values would be ignored; set secrets.create: true (development only) or use secrets.existingSecret" }}
{{- end }}
{{- if and $v.workloadIdentity.enabled (not $v.workloadIdentity.clientId) }}
{{- fail "workloadIdentity.enabled is true but workloadIdentity.clientId is empty: set the client id of the managed identity or app registration" }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled $v.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: Prometheus would scrape every pod twice; enable one" }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor scrapes the metrics Service" }}
{{- end }}
{{- if $v.podDisruptionBudget.enabled }}
{{- if not $v.standalone.enabled }}
{{- fail "podDisruptionBudget.enabled needs standalone.enabled: in sidecar mode the pods (and their budget) are yours" }}
{{- end }}
{{- if and (not (kindIs "invalid" $v.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget.minAvailable and podDisruptionBudget.maxUnavailable are both set: Kubernetes accepts only one" }}
{{- end }}
{{- end }}
{{- if not $v.config.routes }}
{{- fail "config.routes is empty: the proxy needs at least one route (docs/configuration.md)" }}
{{- end }}
{{- if has (toString $v.config.admin.host) (list "127.0.0.1" "localhost" "::1") }}
{{- fail (printf "config.admin.host is %s: kubelet probes and Prometheus reach the admin port from outside the pod; use 0.0.0.0" $v.config.admin.host) }}
{{- end }}
{{- $requests := ($v.resources | default dict).requests | default dict }}
{{- $limits := ($v.resources | default dict).limits | default dict }}
{{- range $r := list "memory" "cpu" }}
{{- $req := index $requests $r }}
{{- $lim := index $limits $r }}
{{- $reqN := 0.0 }}
{{- $limN := 0.0 }}
{{- if not (kindIs "invalid" $req) }}{{ $reqN = include "aml-auth-proxy.quantity" (dict "value" $req "key" (printf "resources.requests.%s" $r)) | float64 }}{{ end }}
{{- if not (kindIs "invalid" $lim) }}{{ $limN = include "aml-auth-proxy.quantity" (dict "value" $lim "key" (printf "resources.limits.%s" $r)) | float64 }}{{ end }}
{{- if and (not (kindIs "invalid" $req)) (not (kindIs "invalid" $lim)) (lt $limN $reqN) }}
{{- fail (printf "resources.limits.%s (%v) is below resources.requests.%s (%v): the API server refuses a container whose limit is below its request; raise resources.limits.%s or lower resources.requests.%s" $r $lim $r $req $r $r) }}
{{- end }}
{{- end }}
{{- if eq (int $v.config.admin.port) (int $v.config.listen.port) }}
{{- fail (printf "config.admin.port and config.listen.port are both %d: the proxy and admin ports must differ" (int $v.config.admin.port)) }}
{{- end }}
{{- $kube := include "aml-auth-proxy.kubeFeatures" . | fromJson }}
{{- range $i, $e := $v.sidecar.extraEnv }}
{{- if and $kube.podEnv (kindIs "map" $e) (has (toString $e.name) (list "POD_NAME" "POD_NAMESPACE")) }}
{{- fail (printf "sidecar.extraEnv[%d] sets %s, which the chart already sets from the downward API (events.enabled or a route's share.lease)" $i $e.name) }}
{{- end }}
{{- if and (kindIs "map" $e) (kindIs "map" $e.valueFrom) (hasKey $e.valueFrom "secretKeyRef") }}
{{- fail (printf "sidecar.extraEnv[%d] (%s) reads a Secret into an environment variable: the proxy takes secrets only as files; put it in the mounted Secret (secrets) and point a *_file key at it" $i $e.name) }}
{{- end }}
{{- end }}
{{- $mount := printf "%s/" (trimSuffix "/" $v.secrets.mountPath) }}
{{- $secretName := include "aml-auth-proxy.secretName" . }}
{{- range $i, $route := $v.config.routes }}
{{- $auth := dict }}
{{- if kindIs "map" $route }}{{ $auth = index $route "auth" | default dict }}{{ end }}
{{- $files := dict }}
{{- if kindIs "map" $auth }}
{{- range $k, $f := $auth }}
{{- if and (hasSuffix "_file" $k) (kindIs "string" $f) }}{{ $_ := set $files (printf "auth.%s" $k) $f }}{{ end }}
{{- end }}
{{- $identity := index $auth "identity" }}
{{- if kindIs "map" $identity }}
{{- range $k, $f := $identity }}
{{- if and (hasSuffix "_file" $k) (kindIs "string" $f) }}{{ $_ := set $files (printf "auth.identity.%s" $k) $f }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $key, $path := $files }}
{{- if hasPrefix $mount $path }}
{{- if not $secretName }}
{{- fail (printf "config.routes[%d].%s (%s) is under secrets.mountPath but no Secret is mounted: set secrets.existingSecret, or secrets.create with secrets.data" $i $key $path) }}
{{- end }}
{{- $file := trimPrefix $mount $path }}
{{- if and $v.secrets.create (not $v.secrets.items) (not (hasKey $v.secrets.data $file)) }}
{{- fail (printf "config.routes[%d].%s (%s) names %q, which is not a key of secrets.data" $i $key $path $file) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if $v.standalone.enabled }}
{{- if not $v.app.image }}
{{- fail "app.image is required in standalone mode (standalone.enabled): the image of your app, which calls the proxy on 127.0.0.1; or set standalone.enabled: false and include the \"aml-auth-proxy.sidecar\" template in your own pods" }}
{{- end }}
{{- range $i, $p := $v.app.ports }}
{{- if has (int $p.containerPort) (list (int $v.config.listen.port) (int $v.config.admin.port)) }}
{{- fail (printf "app.ports[%d].containerPort %d is taken by the proxy (config.listen.port %d, config.admin.port %d): the containers share the pod's network" $i (int $p.containerPort) (int $v.config.listen.port) (int $v.config.admin.port)) }}
{{- end }}
{{- end }}
{{- if and $v.standalone.service.enabled (not $v.app.ports) }}
{{- fail "standalone.service.enabled is true but app.ports is empty: a Service needs ports; list the app's ports or set standalone.service.enabled: false" }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---- The sidecar injector (injector.enabled; templates/injector-*.yaml) ---------------------------------- */}}

{{/* Name prefix of the injector's objects: <full name>-injector. */}}
{{- define "aml-auth-proxy.injector.fullname" -}}
{{- printf "%s-injector" (include "aml-auth-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the injector's pods: never the proxy's (the app Service, the PDB and the NetworkPolicy
select those). */}}
{{- define "aml-auth-proxy.injector.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-injector" (include "aml-auth-proxy.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object of the injector. */}}
{{- define "aml-auth-proxy.injector.labels" -}}
helm.sh/chart: {{ include "aml-auth-proxy.chart" . }}
{{ include "aml-auth-proxy.injector.selectorLabels" . }}
app.kubernetes.io/component: injector
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aml-auth-proxy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Secret holding the webhook's serving certificate (tls.crt, tls.key, ca.crt), chart-made or cert-manager's. */}}
{{- define "aml-auth-proxy.injector.tlsSecretName" -}}
{{- printf "%s-tls" (include "aml-auth-proxy.injector.fullname" .) }}
{{- end }}

{{/* The DNS names the API server may use for the webhook Service, as a JSON list. */}}
{{- define "aml-auth-proxy.injector.dnsNames" -}}
{{- $svc := include "aml-auth-proxy.injector.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson }}
{{- end }}

{{/*
The injector's sidecar template (the ConfigMap <injector>-template, key sidecar.yaml): the container and volumes of
"aml-auth-proxy.sidecar" and "aml-auth-proxy.volumes", rendered twice, with sidecar.native forced to "true" and
to "false". One source for the container spec: the injector only substitutes what is per pod (the config
ConfigMap's name, the Secret's name or no Secret, resources, image). Rendered with:
- events.enabled true, so POD_NAME and POD_NAMESPACE are always in the env (harmless when the pod's config turns
  no Kubernetes feature on);
- a placeholder Secret (no items), so the Secret volume and its mount are there to rename or drop;
- for "native", Kubernetes 1.29 when the release is rendered for an older cluster (the injector then picks
  "plain" anyway, from the API server's version).
*/}}
{{- define "aml-auth-proxy.injector.sidecarTemplate" -}}
{{- $values := deepCopy .Values }}
{{- $_ := set $values.events "enabled" true }}
{{- $_ := set $values.secrets "existingSecret" "aml-auth-proxy-injector-placeholder" }}
{{- $_ := set $values.secrets "create" false }}
{{- $_ := set $values.secrets "data" dict }}
{{- $_ := set $values.secrets "items" list }}
{{- $doc := dict }}
{{- range $mode := list "native" "plain" }}
{{- $v := deepCopy $values }}
{{- $_ := set $v.sidecar "native" (eq $mode "native" | toString) }}
{{- $caps := $.Capabilities }}
{{- if and (eq $mode "native") (not (semverCompare ">=1.28.0-0" $.Capabilities.KubeVersion.Version)) }}
{{- $kube := dict "Version" "v1.29.0" "GitVersion" "v1.29.0" "Major" "1" "Minor" "29" }}
{{- $caps = dict "KubeVersion" $kube "APIVersions" $.Capabilities.APIVersions "HelmVersion" $.Capabilities.HelmVersion }}
{{- end }}
{{- $ctx := dict "Values" $v "Capabilities" $caps "Release" $.Release "Chart" $.Chart "Template" $.Template "Files" $.Files }}
{{- $container := include "aml-auth-proxy.sidecar" $ctx | fromYamlArray | first }}
{{- $volumes := include "aml-auth-proxy.volumes" $ctx | fromYamlArray }}
{{- $_ := set $doc $mode (dict "container" $container "volumes" $volumes) }}
{{- end }}
{{- toYaml $doc }}
{{- end }}
