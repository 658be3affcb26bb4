{{/* Names and labels. */}}
{{- define "sipwarden.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sipwarden.controller" -}}{{ include "sipwarden.fullname" . }}-controller{{- end -}}
{{- define "sipwarden.headless" -}}{{ include "sipwarden.fullname" . }}-controller-headless{{- end -}}
{{- define "sipwarden.edge" -}}{{ include "sipwarden.fullname" . }}-edge{{- end -}}

{{- define "sipwarden.secretName" -}}
{{- if .Values.secrets.create -}}{{ include "sipwarden.fullname" . }}-secrets{{- else -}}{{ required "secrets.existingSecret is required when secrets.create is false" .Values.secrets.existingSecret }}{{- end -}}
{{- end -}}

{{- define "sipwarden.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sipwarden.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sipwarden.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The gRPC address of controller `i` (0-based) in the headless Service. */}}
{{- define "sipwarden.controllerAddr" -}}
{{ include "sipwarden.controller" .root }}-{{ .i }}.{{ include "sipwarden.headless" .root }}.{{ .root.Release.Namespace }}.svc:{{ .root.Values.controller.grpcPort }}
{{- end -}}

{{/* Hardened security contexts shared by every container. */}}
{{- define "sipwarden.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "sipwarden.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* OpenTelemetry environment, when an endpoint is set. */}}
{{- define "sipwarden.otelEnv" -}}
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.otel.samplerArg | quote }}
{{- end }}
{{- end -}}
