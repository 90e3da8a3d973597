{{/* Chart name, truncated to the 63 characters Kubernetes allows in a name. */}}
{{- define "fedward-coordinator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name: release-chart unless the release name already has it. */}}
{{- define "fedward-coordinator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fedward-coordinator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedward-coordinator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedward-coordinator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fedward-coordinator.labels" -}}
helm.sh/chart: {{ include "fedward-coordinator.chart" . }}
{{ include "fedward-coordinator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fedward-coordinator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret that holds FEDWARD_DATABASE_URL, and its key ("" when SQLite is used). */}}
{{- define "fedward-coordinator.databaseSecretName" -}}
{{- if .Values.postgresql.existingSecret -}}
{{- .Values.postgresql.existingSecret -}}
{{- else if .Values.postgresql.url -}}
{{- printf "%s-database" (include "fedward-coordinator.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "fedward-coordinator.databaseSecretKey" -}}
{{- if .Values.postgresql.existingSecret -}}
{{- .Values.postgresql.existingSecretKey -}}
{{- else -}}
database-url
{{- end -}}
{{- end -}}

{{/* Environment shared by the init container and the coordinator. */}}
{{- define "fedward-coordinator.env" -}}
- name: FEDWARD_HOME
  value: {{ .Values.home | quote }}
- name: FEDWARD_API_HOST
  value: "0.0.0.0"
- name: FEDWARD_API_PORT
  value: {{ .Values.api.port | quote }}
- name: FEDWARD_FLEET_HOST
  value: "0.0.0.0"
- name: FEDWARD_FLEET_PORT
  value: {{ .Values.fleet.port | quote }}
- name: FEDWARD_FLEET_HOSTNAMES
  value: {{ required "fleet.hostnames: the names/IPs sites dial" .Values.fleet.hostnames | quote }}
{{- $secret := include "fedward-coordinator.databaseSecretName" . }}
{{- if $secret }}
- name: FEDWARD_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "fedward-coordinator.databaseSecretKey" . }}
{{- end }}
{{- end -}}
