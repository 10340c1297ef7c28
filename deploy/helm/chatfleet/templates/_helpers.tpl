{{/*
Why this file exists: names, labels and the table of the five services are
defined once here; the workload, Service, ConfigMap, HPA, PDB and
NetworkPolicy templates loop over that table instead of repeating themselves.
*/}}

{{- define "chatfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; short so "<fullname>-notifications-<n>" fits DNS labels. */}}
{{- define "chatfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else if contains (include "chatfleet.name" .) .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "chatfleet.name" .) | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "chatsockets"). */}}
{{- define "chatfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatfleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "chatfleet.labels" -}}
{{ include "chatfleet.selectorLabels" . }}
app.kubernetes.io/part-of: chatfleet
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "chatfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "chatfleet.secretName" -}}
{{- default (include "chatfleet.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/*
The services: values key → binary, workload kind, whether it has an internal
listener, and which Secret keys it reads (optional ones may be absent).
StatefulSets give socket pods stable names: their places on Envoy's ring.
*/}}
{{- define "chatfleet.components" -}}
chatpersistence:
  binary: chatpersistence
  kind: Deployment
  internal: true
  secrets: [JWT_SECRET, INTERNAL_SERVICE_TOKEN, MONGODB_URI, REDIS_URL]
  optionalSecrets: []
changehandler:
  binary: chatpersistencechangehandler
  kind: Deployment
  internal: false
  secrets: [INTERNAL_SERVICE_TOKEN, REDIS_URL]
  optionalSecrets: [AI_API_KEY]
chatsockets:
  binary: chatwebsocketshandler
  kind: StatefulSet
  internal: true
  secrets: [JWT_SECRET, INTERNAL_SERVICE_TOKEN]
  optionalSecrets: []
notifications:
  binary: generalnotificationshandler
  kind: StatefulSet
  internal: true
  secrets: [JWT_SECRET, INTERNAL_SERVICE_TOKEN, REDIS_URL]
  optionalSecrets: []
emailhandler:
  binary: emailhandler
  kind: Deployment
  internal: false
  secrets: [MONGODB_URI, REDIS_URL]
  optionalSecrets: [SMTP_USERNAME, SMTP_PASSWORD]
{{- end -}}

{{/* SHUTDOWN_TIMEOUT in whole seconds ("20s", "1m"); fails on other forms. */}}
{{- define "chatfleet.shutdownSeconds" -}}
{{- $raw := toString .Values.config.SHUTDOWN_TIMEOUT -}}
{{- if regexMatch "^[0-9]+s$" $raw -}}
{{- trimSuffix "s" $raw -}}
{{- else if regexMatch "^[0-9]+m$" $raw -}}
{{- mul (atoi (trimSuffix "m" $raw)) 60 -}}
{{- else -}}
{{- fail (printf "config.SHUTDOWN_TIMEOUT=%q: write whole seconds or minutes (20s, 1m) so the chart can check terminationGracePeriodSeconds" $raw) -}}
{{- end -}}
{{- end -}}

{{/* Refuses settings that cannot work; included by every workload. */}}
{{- define "chatfleet.validate" -}}
{{- $shutdown := atoi (include "chatfleet.shutdownSeconds" .) -}}
{{- $needed := add $shutdown (int .Values.preStopSleepSeconds) -}}
{{- if le (int .Values.terminationGracePeriodSeconds) $needed -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + SHUTDOWN_TIMEOUT (%d s), or draining pods are killed mid-drain" (int .Values.terminationGracePeriodSeconds) $needed) -}}
{{- end -}}
{{- $auth := .Values.auth -}}
{{- range $key := list "JWT_ALGORITHM" "JWT_ISSUER" "JWT_AUDIENCE" "JWT_PUBLIC_KEY_FILE" "JWT_JWKS_URL" "JWT_JWKS_REFRESH_INTERVAL" "JWT_SECRET" "INTERNAL_SERVICE_TOKEN" "ALLOWED_ORIGINS" "CLIENT_IP_HEADER" -}}
{{- if hasKey $.Values.config $key -}}
{{- fail (printf "config.%s: set it with the auth.*, edge.* or secrets.* values instead (values.yaml)" $key) -}}
{{- end -}}
{{- end -}}
{{- if not $auth.issuer -}}
{{- fail "auth.issuer is required: the `iss` your token issuer writes into user tokens (JWT_ISSUER); tokens without it are refused" -}}
{{- end -}}
{{- if not $auth.audience -}}
{{- fail "auth.audience is required: the `aud` your token issuer writes into user tokens for chatfleet (JWT_AUDIENCE)" -}}
{{- end -}}
{{- $keySources := 0 -}}
{{- if $auth.publicKey.secretName }}{{ $keySources = add1 $keySources }}{{ end -}}
{{- if $auth.publicKey.configMapName }}{{ $keySources = add1 $keySources }}{{ end -}}
{{- if $auth.jwksUrl }}{{ $keySources = add1 $keySources }}{{ end -}}
{{- if eq $auth.algorithm "HS256" -}}
{{- if gt $keySources 0 -}}
{{- fail "auth.publicKey / auth.jwksUrl are for auth.algorithm=RS256; HS256 uses secrets.jwtSecret" -}}
{{- end -}}
{{- if not .Values.secrets.existingSecret -}}
{{- if not .Values.secrets.jwtSecret -}}
{{- fail "secrets.jwtSecret is required (the HS256 secret shared with your token issuer, at least 32 bytes), or set secrets.existingSecret, or use auth.algorithm=RS256" -}}
{{- end -}}
{{- if lt (len .Values.secrets.jwtSecret) 32 -}}
{{- fail (printf "secrets.jwtSecret is %d bytes: it must be at least 32 random bytes (for example: openssl rand -base64 48)" (len .Values.secrets.jwtSecret)) -}}
{{- end -}}
{{- end -}}
{{- else if eq $auth.algorithm "RS256" -}}
{{- if ne $keySources 1 -}}
{{- fail "auth.algorithm=RS256 needs exactly one of auth.publicKey.secretName, auth.publicKey.configMapName (a PEM public key under auth.publicKey.key) or auth.jwksUrl" -}}
{{- end -}}
{{- else -}}
{{- fail (printf "auth.algorithm=%q: HS256 or RS256" $auth.algorithm) -}}
{{- end -}}
{{- if and (not .Values.secrets.existingSecret) .Values.secrets.internalServiceToken (lt (len .Values.secrets.internalServiceToken) 32) -}}
{{- fail (printf "secrets.internalServiceToken is %d bytes: it must be at least 32 random bytes, or leave it empty to have one generated" (len .Values.secrets.internalServiceToken)) -}}
{{- end -}}
{{- range $key := list "chatsockets" "notifications" -}}
{{- $v := index $.Values $key -}}
{{- $most := ternary (int $v.autoscaling.maxReplicas) (int $v.replicas) $v.autoscaling.enabled -}}
{{- if lt (int $v.ringSize) $most -}}
{{- fail (printf "%s.ringSize (%d) must be at least the most replicas it can have (%d): Envoy only routes to pods 0..ringSize-1" $key (int $v.ringSize) $most) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Prometheus scrape annotations for a pod. */}}
{{- define "chatfleet.metricsAnnotations" -}}
{{- if .root.Values.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: {{ .path | default "/metrics" | quote }}
{{- end }}
{{- end -}}

{{/* DNS name of a Service in the release namespace. */}}
{{- define "chatfleet.svcHost" -}}
{{- printf "%s-%s.%s.svc.cluster.local" (include "chatfleet.fullname" .root) .name .root.Release.Namespace -}}
{{- end -}}
