{{/* The chart's name (nameOverride) and the prefix of every object it names (fullnameOverride), as
cert-manager and external-secrets do: `helm install keyless` names its objects keyless-operator, ... */}}
{{- define "keyless.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "keyless.fullname" -}}
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
{{- end }}

{{/* A component's objects: <fullname>-<component> (keyless-operator, keyless-broker, keyless-webhooks). */}}
{{- define "keyless.componentName" -}}
{{- printf "%s-%s" (include "keyless.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* A component's ServiceAccount: <component>.serviceAccount.name, else its component name when the chart
creates it, else "default". */}}
{{- define "keyless.serviceAccountName" -}}
{{- $values := index .root.Values .component "serviceAccount" -}}
{{- if $values.create -}}
{{- default (include "keyless.componentName" .) $values.name -}}
{{- else -}}
{{- default "default" $values.name -}}
{{- end -}}
{{- end }}

{{/* The username a component's ServiceAccount tokens carry. */}}
{{- define "keyless.serviceAccountUser" -}}
system:serviceaccount:{{ .root.Release.Namespace }}:{{ include "keyless.serviceAccountName" . }}
{{- end }}

{{/* A component's ServiceAccount object, when the chart creates it. */}}
{{- define "keyless.serviceAccount" -}}
{{- $values := index .root.Values .component "serviceAccount" -}}
{{- if $values.create }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "keyless.serviceAccountName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels: {{- include "keyless.labels" . | nindent 4 }}
  {{- with $values.annotations }}
  annotations: {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
---
{{- end }}
{{- end }}

{{/* Labels on every object; `component` is operator, broker or webhooks. */}}
{{- define "keyless.labels" -}}
app.kubernetes.io/name: {{ include "keyless.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: keyless
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "keyless.selector" -}}
app.kubernetes.io/name: {{ include "keyless.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "keyless.image" -}}
{{- $repository := required "image.repository is not set: nothing is published, set it to where you pushed the image you built from the Dockerfile (README: \"The image is not published anywhere\")" .Values.image.repository -}}
{{- if .Values.image.digest -}}
{{ $repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ $repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "keyless.brokerHost" -}}
{{ include "keyless.componentName" (dict "root" . "component" "broker") }}.{{ .Release.Namespace }}.svc
{{- end }}

{{- define "keyless.brokerURL" -}}
https://{{ include "keyless.brokerHost" . }}{{ if ne (int .Values.broker.service.port) 443 }}:{{ .Values.broker.service.port }}{{ end }}
{{- end }}

{{- define "keyless.issuer" -}}
{{- .Values.broker.issuer | default (include "keyless.brokerURL" .) | trimSuffix "/" -}}
{{- end }}

{{/* Refuse values that would weaken the least-privilege RBAC. */}}
{{- define "keyless.validate" -}}
{{- if has .Release.Namespace .Values.tenantNamespaces -}}
{{- fail (printf "tenantNamespaces must not contain the release namespace %q: keep RemoteTenantClusters and their bootstrap kubeconfigs away from the broker's signing keys" .Release.Namespace) -}}
{{- end -}}
{{- if has .Release.Namespace .Values.argocd.namespaces -}}
{{- fail (printf "argocd.namespaces must not contain the release namespace %q: the operator may list Secrets in Argo CD namespaces, and the broker's signing keys live in the release namespace; install Keyless next to Argo CD, not into its namespace" .Release.Namespace) -}}
{{- end -}}
{{- if and .Values.webhooks.enabled (not .Values.webhooks.tls.certManager.enabled) (not .Values.webhooks.tls.caBundle) -}}
{{- fail "webhooks.enabled needs webhooks.tls.caBundle (base64 PEM) or webhooks.tls.certManager.enabled" -}}
{{- end -}}
{{- end }}

{{/* The pod-level volumes every Keyless pod shares: a writable /tmp on a read-only root. */}}
{{- define "keyless.tmpVolume" -}}
- name: tmp
  emptyDir: {medium: Memory, sizeLimit: 16Mi}
{{- end }}

{{/* Webhook configuration pieces (templates/webhooks.yaml). */}}
{{- define "keyless.webhookMeta" -}}
name: {{ include "keyless.fullname" .root }}-tenant-guardrails
labels:
  app.kubernetes.io/managed-by: keyless
  {{- include "keyless.labels" (dict "root" .root "component" "webhooks") | nindent 2 }}
{{- if .root.Values.webhooks.tls.certManager.enabled }}
annotations:
  cert-manager.io/inject-ca-from: {{ .root.Release.Namespace }}/{{ include "keyless.componentName" . }}
{{- end }}
{{- end }}
{{- define "keyless.webhookClientConfig" -}}
service: {namespace: {{ .root.Release.Namespace }}, name: {{ include "keyless.componentName" (dict "root" .root "component" "webhooks") }}, port: 443, path: /{{ .id }}}
{{- with .root.Values.webhooks.tls.caBundle }}
caBundle: {{ . }}
{{- end }}
{{- end }}
{{- define "keyless.webhookRule" -}}
- apiGroups: [argoproj.io]
  apiVersions: [v1alpha1]
  resources: [{{ . }}]
  operations: [CREATE, UPDATE]
  scope: Namespaced
{{- end }}
{{- define "keyless.celList" -}}
{{- $quoted := list }}
{{- range . }}{{ $quoted = append $quoted (toJson .) }}{{ end }}
{{- join ", " $quoted }}
{{- end }}
