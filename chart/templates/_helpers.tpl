{{/*
Chart name, truncated to 52 characters: a StatefulSet's name plus "-" and its
10-character revision hash must fit a 63-character label value.
*/}}
{{- define "taskandgo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release-chart, or the release name alone if it already holds the
chart name. Name of the StatefulSet, client Service, Secret and friends.
*/}}
{{- define "taskandgo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Headless Service: gives each pod its stable DNS name. */}}
{{- define "taskandgo.headlessName" -}}
{{- printf "%s-headless" (include "taskandgo.fullname" .) }}
{{- end }}

{{- define "taskandgo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "taskandgo.labels" -}}
helm.sh/chart: {{ include "taskandgo.chart" . }}
{{ include "taskandgo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: taskandgo
{{- end }}

{{/* Labels that select the release's pods (never change them on upgrade). */}}
{{- define "taskandgo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "taskandgo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "taskandgo.serviceAccountName" -}}
{{- default (include "taskandgo.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "taskandgo.secretName" -}}
{{- default (include "taskandgo.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "taskandgo.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Seconds running tasks get on SIGTERM: the grace period less 10 s (or half of it). */}}
{{- define "taskandgo.taskGrace" -}}
{{- $t := int .Values.terminationGracePeriodSeconds }}
{{- if gt $t 20 }}{{ sub $t 10 }}{{ else }}{{ div $t 2 }}{{ end }}
{{- end }}

{{/* Most voters that may be down while a strict majority stays up. */}}
{{- define "taskandgo.faultTolerance" -}}
{{- div (sub (int .Values.voters) 1) 2 }}
{{- end }}

{{/*
Refuse values that would break Raft: called from the StatefulSet template so
that `helm template`, `helm lint` and `helm install` all stop with the reason.
*/}}
{{- define "taskandgo.validate" -}}
{{- $voters := int .Values.voters }}
{{- $tolerance := int (include "taskandgo.faultTolerance" .) }}
{{- if lt $voters 1 }}
{{- fail "voters must be at least 1" }}
{{- end }}
{{- if lt (int .Values.replicaCount) $voters }}
{{- fail (printf "replicaCount (%d) must be >= voters (%d): pods 0..voters-1 are the Raft members" (int .Values.replicaCount) $voters) }}
{{- end }}
{{- $maxPods := int .Values.replicaCount }}
{{- if .Values.autoscaling.enabled }}
{{- if lt (int .Values.autoscaling.minReplicas) $voters }}
{{- fail (printf "autoscaling.minReplicas (%d) must be >= voters (%d): a scale-down would remove Raft members" (int .Values.autoscaling.minReplicas) $voters) }}
{{- end }}
{{- if lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- $maxPods = int .Values.autoscaling.maxReplicas }}
{{- end }}
{{- if .Values.pdb.enabled }}
{{- $max := .Values.pdb.maxUnavailable }}
{{- $min := .Values.pdb.minAvailable }}
{{- if and (not (kindIs "invalid" $max)) (not (kindIs "invalid" $min)) }}
{{- fail "pdb: set maxUnavailable or minAvailable, not both" }}
{{- end }}
{{- if and (kindIs "invalid" $max) (kindIs "invalid" $min) }}
{{- fail "pdb: set maxUnavailable or minAvailable" }}
{{- end }}
{{- if not (kindIs "invalid" $max) }}
{{- if gt (int $max) $tolerance }}
{{- fail (printf "pdb.maxUnavailable (%d) would let a drain take %d of %d voters and lose the Raft majority; at most %d is safe" (int $max) (int $max) $voters $tolerance) }}
{{- end }}
{{- else }}
{{- if gt (sub $maxPods (int $min)) $tolerance }}
{{- fail (printf "pdb.minAvailable (%d) lets %d of up to %d pods be down, which may be %d voters of %d and lose the Raft majority; use at least %d, or maxUnavailable" (int $min) (sub $maxPods (int $min)) $maxPods (sub $maxPods (int $min)) $voters (sub $maxPods $tolerance)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A probe handler from a probes.<name> value: the gRPC health service on the
grpc port, or an HTTP GET on the http port.
*/}}
{{- define "taskandgo.probe" -}}
{{- $p := .probe }}
{{- if eq $p.type "grpc" -}}
grpc:
  port: {{ .root.Values.ports.grpc }}
  service: {{ $p.grpcService | quote }}
{{- else if eq $p.type "http" -}}
httpGet:
  path: {{ $p.httpPath }}
  port: http
{{- else }}
{{- fail (printf "probe type %q: expected grpc or http" $p.type) }}
{{- end }}
periodSeconds: {{ $p.periodSeconds }}
timeoutSeconds: {{ $p.timeoutSeconds }}
failureThreshold: {{ $p.failureThreshold }}
{{- end }}
