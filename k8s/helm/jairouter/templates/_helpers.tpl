{{- define "jairouter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "jairouter.fullname" -}}
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

{{- define "jairouter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "jairouter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "jairouter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jairouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "jairouter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jairouter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "jairouter.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The Secret holding api-keys.yml (the chart's own, or an existing one). */}}
{{- define "jairouter.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "jairouter.fullname" .)) }}
{{- end }}

{{/* The Secret whose entries are the backend credentials' environment variables. */}}
{{- define "jairouter.credentialsSecret" -}}
{{- .Values.backendCredentials.existingSecret | default (printf "%s-credentials" (include "jairouter.fullname" .)) }}
{{- end }}

{{- define "jairouter.hasCredentials" -}}
{{- if or .Values.backendCredentials.existingSecret .Values.backendCredentials.env }}true{{ end }}
{{- end }}

{{/* The api-keys.yml document of the chart's own Secret. */}}
{{- define "jairouter.apiKeysFile" -}}
jairouter:
  security:
    api-key:
      enabled: {{ .Values.apiKeys.enabled }}
      header-name: {{ .Values.apiKeys.headerName | quote }}
      keys:
        {{- toYaml .Values.apiKeys.keys | nindent 8 }}
{{- end }}

{{/* Arguments shared by the renderer's bootstrap, watch and check (the configuration files). */}}
{{- define "jairouter.configArgs" -}}
- /etc/jairouter/config/application.yml
{{- if .Values.apiKeys.enabled }}
- --api-keys
- /etc/jairouter/api-keys/api-keys.yml
{{- end }}
{{- end }}

{{/* Environment of the containers that resolve ${NAME} placeholders. */}}
{{- define "jairouter.credentialsEnv" -}}
{{- if include "jairouter.hasCredentials" . }}
envFrom:
  - secretRef:
      name: {{ include "jairouter.credentialsSecret" . }}
{{- end }}
{{- end }}

{{/* The configuration files and the run directory, for the renderer's containers. */}}
{{- define "jairouter.configMounts" -}}
- name: config
  mountPath: /etc/jairouter/config
  readOnly: true
{{- if .Values.apiKeys.enabled }}
- name: api-keys
  mountPath: /etc/jairouter/api-keys
  readOnly: true
{{- end }}
- name: run
  mountPath: /var/run/jairouter
{{- end }}

{{/*
  The application.yml the pods read: config.application.yml, and with tracing.enabled a second
  YAML document holding the original's jairouter.tracing section built from the tracing values
  (the renderer reads each part from the first document that has it).
*/}}
{{- define "jairouter.applicationYml" -}}
{{- $app := index .Values.config "application.yml" -}}
{{- $t := .Values.tracing -}}
{{- if not $t.enabled }}
{{- $app }}
{{- else }}
{{- if dig "jairouter" "tracing" "" (fromYaml $app) }}
{{- fail "tracing.enabled: config.application.yml has a jairouter.tracing section of its own; keep one of them" }}
{{- end }}
{{- $app | trimSuffix "\n" }}
---
# From the chart's tracing values.
jairouter:
  tracing:
    enabled: true
    service-name: {{ $t.serviceName | quote }}
    sampling:
      ratio: {{ $t.samplingRatio }}
    exporter:
      type: otlp
      otlp:
        endpoint: {{ required "tracing.endpoint: the collector's OTLP endpoint, e.g. http://otel-collector.observability:4317" $t.endpoint | quote }}
        protocol: {{ $t.protocol | quote }}
        {{- with $t.headers }}
        headers:
          {{- toYaml . | nindent 10 }}
        {{- end }}
{{- end }}
{{- end }}
