{{/*
Names and labels shared by every template. Object names are "<fullname>" (operator) and
"<fullname>-nats" (the bus); all fit the 63-character label limit.
*/}}

{{- define "asyncrlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "asyncrlhf.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 58 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 58 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 58 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "asyncrlhf.natsName" -}}
{{- printf "%s-nats" (include "asyncrlhf.fullname" .) }}
{{- end }}

{{- define "asyncrlhf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "asyncrlhf.labels" -}}
helm.sh/chart: {{ include "asyncrlhf.chart" . }}
app.kubernetes.io/name: {{ include "asyncrlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: asyncrlhf
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the operator pod (stable across upgrades: never add to these). */}}
{{- define "asyncrlhf.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "asyncrlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Selector labels of the NATS pod. */}}
{{- define "asyncrlhf.natsSelectorLabels" -}}
app.kubernetes.io/name: {{ include "asyncrlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nats
{{- end }}

{{- define "asyncrlhf.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "asyncrlhf.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" or "repository@digest". Call with (dict "image" .Values.x.image "default" "tag"). */}}
{{- define "asyncrlhf.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .default .image.tag) }}
{{- end }}
{{- end }}

{{/* The namespace the operator watches in namespaced scope. */}}
{{- define "asyncrlhf.watchNamespace" -}}
{{- default .Release.Namespace .Values.operator.watchNamespace }}
{{- end }}

{{/* Checks that cannot be written in values.schema.json; rendered once, from the operator Deployment. */}}
{{- define "asyncrlhf.validate" -}}
{{- if and (not .Values.nats.enabled) (not .Values.nats.externalUrl) }}
{{- fail "nats.enabled is false: set nats.externalUrl to an existing NATS server with JetStream (nats://host:4222)" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.nats.externalUrl }}
{{- fail "nats.externalUrl is set while nats.enabled is true: choose one (set nats.enabled=false to use the external NATS)" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled (the ServiceMonitor selects the metrics Service)" }}
{{- end }}
{{- if and (not .Values.nats.enabled) .Values.nats.auth.enabled (ne .Values.nats.auth.mode "jwt") (not .Values.nats.auth.existingSecret) }}
{{- fail "an external NATS with auth needs nats.auth.existingSecret (a Secret with the user and password); or set nats.auth.enabled=false" }}
{{- end }}
{{- if and .Values.nats.auth.enabled (eq .Values.nats.auth.mode "jwt") (not .Values.nats.auth.jwt.existingSecret) }}
{{- fail "nats.auth.mode jwt needs nats.auth.jwt.existingSecret: make it once with `asyncrlhf nats-auth --namespace <release namespace> -o nats-jwt.yaml` and `kubectl apply -f nats-jwt.yaml`" }}
{{- end }}
{{- if and .Values.nats.tls.enabled (not .Values.nats.tls.secretName) }}
{{- fail "nats.tls.enabled needs nats.tls.secretName: a Secret with tls.crt, tls.key and ca.crt (e.g. from a cert-manager Certificate for the NATS Service)" }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the NATS user and password. */}}
{{- define "asyncrlhf.natsSecretName" -}}
{{- default (printf "%s-auth" (include "asyncrlhf.natsName" .)) .Values.nats.auth.existingSecret }}
{{- end }}

{{/* The NATS URL the operator connects to (never with credentials in it). */}}
{{- define "asyncrlhf.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc.%s:%d" (include "asyncrlhf.natsName" .) .Release.Namespace .Values.clusterDomain (int .Values.nats.service.port) }}
{{- else }}
{{- .Values.nats.externalUrl }}
{{- end }}
{{- end }}

{{/*
Env entries that hand the NATS credentials over by secretKeyRef (never as plain values).
Call with (dict "ctx" $ "prefix" "NATS_"): the operator reads ASYNCRLHF_NATS_USER/PASSWORD (the
names the job pods use too), the NATS server NATS_USER/NATS_PASSWORD (referenced by nats.conf).
*/}}
{{- define "asyncrlhf.natsAuthEnv" -}}
{{- $values := .ctx.Values.nats.auth }}
{{- if and $values.enabled (ne $values.mode "jwt") }}
- name: {{ .prefix }}USER
  valueFrom:
    secretKeyRef:
      name: {{ include "asyncrlhf.natsSecretName" .ctx }}
      key: {{ $values.userKey }}
- name: {{ .prefix }}PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "asyncrlhf.natsSecretName" .ctx }}
      key: {{ $values.passwordKey }}
{{- end }}
{{- end }}

{{/*
JWT mode (nats.auth.mode jwt): the operator's env, by secretKeyRef: the jobs' account signing
seed and the account's public key (asyncrlhf_operator.natsauth reads them); TLS: the CA's path.
*/}}
{{- define "asyncrlhf.operatorNatsEnv" -}}
{{- if and .Values.nats.auth.enabled (eq .Values.nats.auth.mode "jwt") }}
- name: ASYNCRLHF_NATS_ACCOUNT_SEED
  valueFrom:
    secretKeyRef:
      name: {{ .Values.nats.auth.jwt.existingSecret }}
      key: account-signing-seed
- name: ASYNCRLHF_NATS_ACCOUNT
  valueFrom:
    secretKeyRef:
      name: {{ .Values.nats.auth.jwt.existingSecret }}
      key: account
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: ASYNCRLHF_NATS_TLS_CA
  value: /etc/asyncrlhf/nats-tls/ca.crt
{{- end }}
{{- end }}

{{/* The operator writes a Secret <job>-nats per job (JWT mode: the job's user; TLS: the CA). */}}
{{- define "asyncrlhf.operatorWritesSecrets" -}}
{{- if or (and .Values.nats.auth.enabled (eq .Values.nats.auth.mode "jwt")) .Values.nats.tls.enabled }}true{{ end }}
{{- end }}

{{/* Name of the kopf peering object the operator's replicas share (cluster-scoped in cluster
scope, so it carries the release namespace like the ClusterRole). */}}
{{- define "asyncrlhf.peeringName" -}}
{{- if eq .Values.rbac.scope "cluster" -}}
{{- printf "%s-%s" .Release.Namespace (include "asyncrlhf.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- include "asyncrlhf.fullname" . -}}
{{- end -}}
{{- end }}
