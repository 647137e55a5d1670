{{/* Name of the chart, or nameOverride. */}}
{{- define "twinsite.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name added unless it is already in it. */}}
{{- define "twinsite.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "twinsite.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "twinsite.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "twinsite.selectorLabels" -}}
app.kubernetes.io/name: {{ include "twinsite.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "twinsite.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "twinsite.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "twinsite.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "twinsite.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "twinsite.leaseName" -}}
{{- default (printf "%s-leader" (include "twinsite.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The one namespace whose Secrets the controller reads. */}}
{{- define "twinsite.secretNamespace" -}}
{{- default .Release.Namespace .Values.secretNamespace }}
{{- end }}
