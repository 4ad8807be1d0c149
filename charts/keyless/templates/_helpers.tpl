{{/* Labels on every object; `component` is operator, broker or webhooks. */}}
{{- define "keyless.labels" -}}
app.kubernetes.io/name: keyless
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: keyless
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "keyless.selector" -}}
app.kubernetes.io/name: keyless
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "keyless.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "keyless.serviceAccountName" -}}
system:serviceaccount:{{ .root.Release.Namespace }}:{{ .name }}
{{- end }}

{{- define "keyless.brokerHost" -}}
keyless-broker.{{ .Release.Namespace }}.svc
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
name: keyless-tenant-guardrails
labels:
  app.kubernetes.io/managed-by: keyless
  {{- include "keyless.labels" (dict "root" .root "component" "webhooks") | nindent 2 }}
{{- if .root.Values.webhooks.tls.certManager.enabled }}
annotations:
  cert-manager.io/inject-ca-from: {{ .root.Release.Namespace }}/keyless-webhooks
{{- end }}
{{- end }}
{{- define "keyless.webhookClientConfig" -}}
service: {namespace: {{ .root.Release.Namespace }}, name: keyless-webhooks, port: 443, path: /{{ .id }}}
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
