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
{{- $app := include "jairouter.applicationYmlWithGlobalRateLimit" . -}}
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

{{/* --- Limits across replicas (globalRateLimit): jairouter-ratelimit and its Redis. --- */}}

{{- define "jairouter.ratelimit.fullname" -}}
{{- printf "%s-ratelimit" (include "jairouter.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{- define "jairouter.redis.fullname" -}}
{{- printf "%s-ratelimit-redis" (include "jairouter.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}

{{/* Selector labels of the rate-limit service's pods (a name of their own: the gateway's
     selectors never match them). */}}
{{- define "jairouter.ratelimit.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-ratelimit" (include "jairouter.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ratelimit
{{- end }}

{{- define "jairouter.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-ratelimit-redis" (include "jairouter.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ratelimit-redis
{{- end }}

{{- define "jairouter.ratelimit.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "jairouter.ratelimit.selectorLabels" . }}
app.kubernetes.io/part-of: {{ include "jairouter.name" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "jairouter.redis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "jairouter.redis.selectorLabels" . }}
app.kubernetes.io/part-of: {{ include "jairouter.name" . }}
app.kubernetes.io/version: {{ .Values.globalRateLimit.redis.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "jairouter.ratelimit.image" -}}
{{- $i := .Values.globalRateLimit.service.image -}}
{{ $i.repository }}:{{ $i.tag | default .Chart.AppVersion }}
{{- end }}

{{/* host:port of the rate-limit service the gateway asks: the chart's own, or an existing one. */}}
{{- define "jairouter.ratelimit.address" -}}
{{- $s := .Values.globalRateLimit.service -}}
{{- if $s.create }}
{{- printf "%s:8081" (include "jairouter.ratelimit.fullname" .) }}
{{- else }}
{{- required "globalRateLimit.service.address: host:port of the rate-limit service (globalRateLimit.service.create is false)" $s.address }}
{{- end }}
{{- end }}

{{/* The URL of the Redis the chart's rate-limit service uses (without existingSecret). */}}
{{- define "jairouter.redis.url" -}}
{{- $r := .Values.globalRateLimit.redis -}}
{{- if $r.create }}
{{- printf "redis://%s:6379/0" (include "jairouter.redis.fullname" .) }}
{{- else }}
{{- required "globalRateLimit.redis.url (or globalRateLimit.redis.existingSecret): the Redis of the rate-limit service (globalRateLimit.redis.create is false)" $r.url }}
{{- end }}
{{- end }}

{{/* The gateway's model.gateway.global-rate-limit block, as one flow mapping. */}}
{{- define "jairouter.globalRateLimitBlock" -}}
{{- $g := .Values.globalRateLimit -}}
{{- if not (has $g.tokenSettlement (list "refunds" "charges-only")) }}
{{- fail (printf "globalRateLimit.tokenSettlement: refunds (jairouter-ratelimit) or charges-only (a third-party service), got %v" $g.tokenSettlement) }}
{{- end }}
{{- dict "address" (include "jairouter.ratelimit.address" .) "domain" $g.domain "failure-mode-deny" $g.failureModeDeny "timeout-ms" (int $g.timeoutMs) "token-settlement" $g.tokenSettlement | toJson }}
{{- end }}

{{/*
  config.application.yml, with globalRateLimit.enabled carrying model.gateway.global-rate-limit.
  The renderer takes the whole model section from the first document that has one, so the block
  goes into that document: as lines inserted under its `model:` line when the model has no
  gateway section yet (the user's text is kept as written), otherwise by rewriting that document
  from its parsed form (same settings; comments and key order are not kept).
*/}}
{{- define "jairouter.applicationYmlWithGlobalRateLimit" -}}
{{- $app := index .Values.config "application.yml" -}}
{{- if not .Values.globalRateLimit.enabled }}
{{- $app }}
{{- else }}
{{- $block := include "jairouter.globalRateLimitBlock" . -}}
{{- $parts := regexSplit "(?m)^---.*$" $app -1 -}}
{{- $at := -1 -}}
{{- $bare := false -}}
{{- range $i, $part := $parts }}
{{- $doc := fromYaml $part }}
{{- if and (lt $at 0) (hasKey $doc "model") }}
{{- $at = $i }}
{{- end }}
{{- end }}
{{- if lt $at 0 }}
{{- /* A file holding just the model's content (services: at the top). */}}
{{- range $i, $part := $parts }}
{{- if and (lt $at 0) (hasKey (fromYaml $part) "services") }}
{{- $at = $i }}
{{- $bare = true }}
{{- end }}
{{- end }}
{{- end }}
{{- if lt $at 0 }}
{{- fail "globalRateLimit.enabled: config.application.yml has no model: section to add gateway.global-rate-limit to" }}
{{- end }}
{{- $part := index $parts $at }}
{{- $doc := fromYaml $part }}
{{- $model := ternary $doc (get $doc "model") $bare }}
{{- if not (kindIs "map" $model) }}{{ $model = dict }}{{ end }}
{{- $gateway := get $model "gateway" }}
{{- if and (kindIs "map" $gateway) (hasKey $gateway "global-rate-limit") }}
{{- fail "globalRateLimit.enabled: config.application.yml has a model.gateway.global-rate-limit of its own; keep one of them" }}
{{- end }}
{{- $line := regexFind "(?m)^model:[ \t]*(#.*)?$" $part }}
{{- $rest := "" }}
{{- $indent := "" }}
{{- if and $line (not $bare) (not (hasKey $model "gateway")) }}
{{- $rest = index (regexSplit "(?m)^model:[ \t]*(#.*)?$" $part 2) 1 }}
{{- $first := regexFind "(?m)^ *[^ #\r\n]" $rest }}
{{- if $first }}{{ $indent = substr 0 (int (sub (len $first) 1)) $first }}{{ end }}
{{- end }}
{{- $new := "" }}
{{- if $indent }}
{{- $before := index (regexSplit "(?m)^model:[ \t]*(#.*)?$" $part 2) 0 }}
{{- $new = printf "%s%s\n%s# From the chart's globalRateLimit values.\n%sgateway:\n%s%sglobal-rate-limit: %s%s" $before $line $indent $indent $indent $indent $block $rest }}
{{- else }}
{{- if not (kindIs "map" $gateway) }}{{ $gateway = dict }}{{ end }}
{{- $_ := set $gateway "global-rate-limit" (fromJson $block) }}
{{- $_ := set $model "gateway" $gateway }}
{{- if not $bare }}{{ $_ := set $doc "model" $model }}{{ end }}
{{- $new = printf "\n# Rewritten by the chart to add model.gateway.global-rate-limit (globalRateLimit values).\n%s\n" (toYaml $doc) }}
{{- if eq $at 0 }}{{ $new = trimPrefix "\n" $new }}{{ end }}
{{- end }}
{{- $out := list }}
{{- range $i, $p := $parts }}
{{- $out = append $out (ternary $new $p (eq $i $at)) }}
{{- end }}
{{- join "---" $out }}
{{- end }}
{{- end }}
