{{- define "recalib.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "recalib.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "api") */}}
{{- define "recalib.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "recalib.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "recalib.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{/* secrets only the API reads; they go into the ...-api Secret, never the workers' */}}
{{- define "recalib.apiOnlySecrets" -}}["RECALIB_API_KEYS", "RECALIB_WEBHOOK_SECRETS"]{{- end -}}

{{- define "recalib.secretName" -}}
{{- default (printf "%s-env" (include "recalib.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The RQ keys KEDA counts. rq names a queue's list rq:queue:<name> (rq.Queue.redis_queue_namespace_prefix)
     and its started-job registry rq:wip:<name> (rq.registry.StartedJobRegistry); the name is queue.name,
     the one value that also becomes RECALIB_QUEUE_NAME. tests/deploy asserts both against rq. */}}
{{- define "recalib.queueListKey" -}}rq:queue:{{ .Values.queue.name }}{{- end -}}
{{- define "recalib.queueWipKey" -}}rq:wip:{{ .Values.queue.name }}{{- end -}}

{{/* RECALIB_REDIS_URL: the embedded StatefulSet's Service (by its full name: KEDA's operator
     resolves it from its own namespace), or redis.url */}}
{{- define "recalib.redisUrl" -}}
{{- if .Values.redis.embedded.enabled -}}redis://{{ include "recalib.fullname" . }}-redis.{{ .Release.Namespace }}.svc:{{ .Values.redis.embedded.port }}/0{{- else -}}{{ .Values.redis.url }}{{- end -}}
{{- end -}}

{{- define "recalib.redisParsed" -}}
{{- $u := urlParse (include "recalib.redisUrl" .) -}}
{{- $hostport := splitList ":" $u.host -}}
{{- $port := "6379" -}}{{- if gt (len $hostport) 1 -}}{{- $port = last $hostport -}}{{- end -}}
{{- $db := trimPrefix "/" $u.path | default "0" -}}
{{- $password := "" -}}{{- if $u.userinfo -}}{{- $password = last (splitList ":" $u.userinfo) -}}{{- end -}}
{{- dict "host" (first $hostport) "port" $port "db" $db "tls" (eq $u.scheme "rediss") "password" $password | toJson -}}
{{- end -}}

{{/* port of the object store's endpoint (443 for AWS S3 and https endpoints) */}}
{{- define "recalib.storePort" -}}
{{- if .Values.storage.s3EndpointUrl -}}
{{- $u := urlParse .Values.storage.s3EndpointUrl -}}
{{- $hp := splitList ":" $u.host -}}
{{- if gt (len $hp) 1 -}}{{ last $hp }}{{- else if eq $u.scheme "http" -}}80{{- else -}}443{{- end -}}
{{- else -}}443{{- end -}}
{{- end -}}

{{- define "recalib.drainTimeoutSeconds" -}}
{{- $d := int .Values.worker.drain.timeoutSeconds -}}
{{- if or (eq $d 0) (gt $d (int .Values.jobTimeoutSeconds)) -}}{{ int .Values.jobTimeoutSeconds }}{{- else -}}{{ $d }}{{- end -}}
{{- end -}}

{{/* Render-time refusals: fail with a message naming the values to change. */}}
{{- define "recalib.validate" -}}
{{- if not .Values.storage.url -}}
{{- $workers := ternary (int .Values.keda.maxReplicaCount) (int .Values.worker.replicas) .Values.keda.enabled -}}
{{- $apis := ternary (int .Values.api.autoscaling.maxReplicas) (int .Values.api.replicas) .Values.api.autoscaling.enabled -}}
{{- if or (gt $apis 1) (gt $workers 1) .Values.keda.enabled -}}
{{- fail (printf "storage.url is empty (local storage: RECALIB_STORAGE_URL unset), which needs one data directory shared by one API pod and one worker pod, but this release would run %d API and up to %d worker pods (or KEDA): set storage.url to s3://bucket/prefix, or api.replicas=1, api.autoscaling.enabled=false, worker.replicas=1, keda.enabled=false" $apis $workers) -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.redis.embedded.enabled) (not .Values.redis.url) (not .Values.secrets.existingSecret) -}}
{{- fail "redis.url is empty: give the URL of a managed Redis with AOF (RECALIB_REDIS_URL), or set redis.embedded.enabled=true for a trial" -}}
{{- end -}}
{{- if and .Values.keda.enabled (not .Values.redis.url) (not .Values.redis.embedded.enabled) (not .Values.keda.redis.address) -}}
{{- fail "keda.redis.address is empty and redis.url is in secrets.existingSecret: give KEDA's Redis scaler host:port in keda.redis.address" -}}
{{- end -}}
{{- if lt (int (index .Values.settings "RECALIB_JOB_MAX_ATTEMPTS" | default "2")) 2 -}}
{{- fail "settings.RECALIB_JOB_MAX_ATTEMPTS is below 2: a job handed back by a draining worker (scale-down, node drain, rollout) uses an attempt, so with 1 it would fail instead of running again elsewhere" -}}
{{- end -}}
{{- if not (has .Values.worker.sandbox (list "strict" "basic" "off")) -}}
{{- fail (printf "worker.sandbox %q is not one of strict, basic, off (RECALIB_SANDBOX)" .Values.worker.sandbox) -}}
{{- end -}}
{{- if and (eq .Values.worker.sandbox "strict") (eq .Values.worker.seccompProfile.type "RuntimeDefault") -}}
{{- fail "worker.sandbox=strict unshares a user and a network namespace, which the RuntimeDefault seccomp profile refuses (the worker would refuse to start): set worker.seccompProfile to a Localhost profile that allows unshare (or type Unconfined), or keep worker.sandbox=basic" -}}
{{- end -}}
{{- end -}}

{{- define "recalib.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}
