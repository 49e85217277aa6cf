{{/* Names ---------------------------------------------------------------- */}}

{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sluice.fullname" -}}
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

{{- define "sluice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end }}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sluice.rulesConfigMapName" -}}
{{- default (printf "%s-rules" (include "sluice.fullname" .)) .Values.rules.existingConfigMap }}
{{- end }}

{{- define "sluice.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Settings -------------------------------------------------------------- */}}

{{/* Whether the chart runs its own Redis (store.type=redis without a host). */}}
{{- define "sluice.bundledRedis" -}}
{{- if and (eq .Values.store.type "redis") (not .Values.store.redis.host) }}true{{ end }}
{{- end }}

{{/* The chart's own Redis: a name of its own, so that no selector of
sluice's (Services, PDB, NetworkPolicy) picks its pod. */}}
{{- define "sluice.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sluice.redisLabels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.redisSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
app.kubernetes.io/component: redis
{{- end }}

{{- define "sluice.redisName" -}}
{{- printf "%s-redis" (include "sluice.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret and key holding the Redis password, if any. */}}
{{- define "sluice.redisPasswordSecret" -}}
{{- if .Values.store.passwordSecret.name }}
{{- .Values.store.passwordSecret.name }}
{{- else if include "sluice.bundledRedis" . }}
{{- include "sluice.redisName" . }}
{{- end }}
{{- end }}

{{- define "sluice.redisPasswordKey" -}}
{{- ternary .Values.store.passwordSecret.key "password" (not (empty .Values.store.passwordSecret.name)) }}
{{- end }}

{{/* The Secret holding the key secret: the one named, or the generated one. */}}
{{- define "sluice.keySecretName" -}}
{{- if .Values.keySecret.existingSecret }}
{{- .Values.keySecret.existingSecret }}
{{- else if include "sluice.needsKeySecret" . }}
{{- printf "%s-key" (include "sluice.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sluice.keySecretKey" -}}
{{- ternary .Values.keySecret.key "key-secret" (not (empty .Values.keySecret.existingSecret)) }}
{{- end }}

{{/*
A random value that stays what it was: the one in the release's existing
Secret NAME under KEY (helm upgrade), else a new one (helm install, helm
template). dict "context" . "name" NAME "key" KEY.
*/}}
{{- define "sluice.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .context.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}

{{/* The SLUICE_STORE value for store.type. */}}
{{- define "sluice.storeUrl" -}}
{{- $s := .Values.store }}
{{- if eq $s.type "memory" }}
{{- print "memory" }}
{{- else if include "sluice.bundledRedis" . }}
{{- printf "redis://%s:%d/0" (include "sluice.redisName" .) (int $s.redis.port) }}
{{- else if eq $s.type "redis" }}
{{- printf "%s://%s:%d/%d" (ternary "rediss" "redis" $s.redis.tls) $s.redis.host (int $s.redis.port) (int $s.redis.db) }}
{{- else if eq $s.type "redisSentinel" }}
{{- printf "%s://%s/%s/%d" (ternary "rediss+sentinel" "redis+sentinel" $s.redisSentinel.tls) (join "," $s.redisSentinel.sentinels) $s.redisSentinel.masterName (int $s.redisSentinel.db) }}
{{- else if eq $s.type "redisCluster" }}
{{- printf "%s://%s" (ternary "rediss+cluster" "redis+cluster" $s.redisCluster.tls) (join "," $s.redisCluster.nodes) }}
{{- end }}
{{- end }}

{{/*
Whether sluice needs a shared key secret: Redis keys hold keyed hashes of
client ids, and PostgreSQL holds API keys as keyed hashes.
*/}}
{{- define "sluice.needsKeySecret" -}}
{{- if or (ne .Values.store.type "memory") (eq .Values.rules.source "postgres") }}true{{ end }}
{{- end }}

{{/* Whether sluice needs PostgreSQL at all (rules or API keys). */}}
{{- define "sluice.usesPostgres" -}}
{{- if or (eq .Values.rules.source "postgres") .Values.postgres.url .Values.postgres.urlSecret.name }}true{{ end }}
{{- end }}

{{/* Whether the migration hook Job runs. */}}
{{- define "sluice.migrate" -}}
{{- $m := .Values.postgres.migrate.enabled }}
{{- if kindIs "bool" $m }}{{ if $m }}true{{ end }}
{{- else if eq .Values.rules.source "postgres" }}true
{{- end }}
{{- end }}

{{/*
Checks that values.schema.json cannot express. Rendered (to nothing) by every
template that depends on them, so `helm template` and `helm install` both stop
with one clear message.
*/}}
{{- define "sluice.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.rules.source "postgres") (not $v.keySecret.existingSecret) }}
{{- fail (printf "rules.source=postgres needs keySecret.existingSecret: the name of an existing Secret whose %q key holds the secret that hashes client ids and API keys (SLUICE_KEY_SECRET); every pod must share it, and `sluice keys issue` needs the same value. Create one with: kubectl create secret generic sluice-key --from-literal=%s=\"$(head -c32 /dev/urandom | base64)\"" $v.keySecret.key $v.keySecret.key) }}
{{- end }}
{{- if and (eq $v.store.type "memory") (not $v.store.memory.perPodLimits) (or $v.autoscaling.enabled (gt (int $v.replicaCount) 1)) }}
{{- $pods := ternary (printf "up to %d pods (the HPA's maxReplicas)" (int $v.autoscaling.maxReplicas)) (printf "%d replicas" (int $v.replicaCount)) $v.autoscaling.enabled }}
{{- fail (printf "store.type=memory with %s: every pod would count on its own, so a client would get up to %s times its limit. Use a shared store (store.type=redis, the chart's own Redis by default, or redisSentinel/redisCluster), or set store.memory.perPodLimits=true if per-pod limits are intended (or run one replica with autoscaling.enabled=false)" $pods (ternary (toString (int $v.autoscaling.maxReplicas)) (toString (int $v.replicaCount)) $v.autoscaling.enabled)) }}
{{- end }}
{{- if and (eq $v.store.type "redisSentinel") (not $v.store.redisSentinel.sentinels) }}
{{- fail "store.type=redisSentinel needs store.redisSentinel.sentinels: a list of host:port sentinels" }}
{{- end }}
{{- if and (include "sluice.bundledRedis" .) $v.store.redis.tls }}
{{- fail "store.redis.tls needs store.redis.host: the chart's own Redis serves plaintext inside the cluster" }}
{{- end }}
{{- if and (eq $v.store.type "redisCluster") (not $v.store.redisCluster.nodes) }}
{{- fail "store.type=redisCluster needs store.redisCluster.nodes: a list of host:port seed nodes" }}
{{- end }}
{{- if and (eq $v.rules.source "postgres") (not $v.postgres.url) (not $v.postgres.urlSecret.name) }}
{{- fail "rules.source=postgres needs postgres.url or postgres.urlSecret.name" }}
{{- end }}
{{- if and (include "sluice.migrate" .) (not $v.postgres.url) (not $v.postgres.urlSecret.name) }}
{{- fail "postgres.migrate.enabled needs postgres.url or postgres.urlSecret.name" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: an existing kubernetes.io/tls Secret" }}
{{- end }}
{{- if and $v.tls.enabled (eq $v.probes.type "grpc") }}
{{- fail "tls.enabled with probes.type=grpc: kubelet's gRPC probes cannot speak TLS; set probes.type=http (probes /healthz and /readyz on the HTTP port)" }}
{{- end }}
{{- if and (eq $v.rules.source "configMap") (not $v.rules.existingConfigMap) (not $v.rules.files) }}
{{- fail "rules.source=configMap needs rules.files or rules.existingConfigMap" }}
{{- end }}
{{- end }}

{{/* env entry from a Secret key */}}
{{- define "sluice.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}

{{/* Database environment, shared by the Deployment and the migration Job. */}}
{{- define "sluice.databaseEnv" -}}
{{- $p := .Values.postgres }}
{{- if $p.urlSecret.name }}
{{ include "sluice.secretEnv" (dict "env" "SLUICE_DATABASE_URL" "name" $p.urlSecret.name "key" $p.urlSecret.key) }}
{{- else if $p.url }}
- name: SLUICE_DATABASE_URL
  value: {{ $p.url | quote }}
{{- end }}
{{- if $p.replicaUrl }}
- name: SLUICE_DATABASE_REPLICA_URL
  value: {{ $p.replicaUrl | quote }}
{{- end }}
{{- if $p.passwordSecret.name }}
{{ include "sluice.secretEnv" (dict "env" "SLUICE_DATABASE_PASSWORD" "name" $p.passwordSecret.name "key" $p.passwordSecret.key) }}
{{- end }}
{{- end }}

{{/* Pod security and scheduling pieces shared by the Deployment and the Job. */}}
{{- define "sluice.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
One NetworkPolicy egress rule as a one-item list: dict with "to" (peers, may
be empty for any address), "ports" and optional "protocols" (default TCP).
*/}}
{{- define "sluice.networkPolicyRule" -}}
{{- $ports := list }}
{{- $protocols := .protocols | default (list "TCP") }}
{{- range .ports }}
{{- $port := . }}
{{- range $protocols }}
{{- $ports = append $ports (dict "port" $port "protocol" .) }}
{{- end }}
{{- end }}
{{- $rule := dict "ports" $ports }}
{{- with .to }}
{{- $_ := set $rule "to" . }}
{{- end }}
{{- toYaml (list $rule) }}
{{- end }}

{{/* grpcurl's connection flags, for NOTES.txt */}}
{{- define "sluice.grpcurlFlags" -}}
{{- if .Values.tls.enabled -}}
-cacert ca.crt -servername {{ include "sluice.fullname" . }}.{{ .Release.Namespace }}.svc{{ if .Values.tls.clientCA.secretName }} -cert client.crt -key client.key{{ end }}
{{- else -}}
-plaintext
{{- end -}}
{{- end }}

{{/*
The broker URL and queue prefix, for serve and the consumer alike. The URL
holds credentials, so it comes from a Secret.
*/}}
{{- define "sluice.eventsEnv" -}}
- name: SLUICE_EVENTS_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "events.enabled needs events.urlSecret.name (a Secret holding the amqp:// URL)" .Values.events.urlSecret.name }}
      key: {{ .Values.events.urlSecret.key }}
{{- with .Values.events.prefix }}
- name: SLUICE_EVENTS_PREFIX
  value: {{ . | quote }}
{{- end }}
{{- end }}
