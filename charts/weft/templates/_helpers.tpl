{{/* The labels every object of the chart carries. */}}
{{- define "weft.labels" -}}
app.kubernetes.io/part-of: weft
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* An image reference: registry/repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "weft.image" -}}
{{- $img := .image -}}
{{- $registry := .root.Values.image.registry -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if $registry }}{{ $registry }}/{{ end }}{{ $img }}:{{ $tag }}
{{- end }}

{{/* The namespace that holds the CA secret and mesh-wide policy. */}}
{{- define "weft.rootNamespace" -}}
{{- .Values.rootNamespace | default .Release.Namespace -}}
{{- end }}

{{/* The controller's in-cluster address, as ztunnel and waypoints dial it. */}}
{{- define "weft.xdsAddress" -}}
weft-controller.{{ .Release.Namespace }}.svc:{{ .Values.controller.ports.xds }}
{{- end }}

{{/*
Whether to render the CRD `.name`: it is absent from the cluster, or this
release installed it. One that exists from elsewhere (Istio's base chart,
the Gateway API's release) is left alone. `helm template` cannot look, and
renders them all.
*/}}
{{- define "weft.crdIsOurs" -}}
{{- $crd := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" .name -}}
{{- if or (not $crd) (eq (dig "metadata" "annotations" "meta.helm.sh/release-name" "" $crd) .root.Release.Name) -}}
true
{{- end -}}
{{- end }}
