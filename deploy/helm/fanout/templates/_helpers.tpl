{{/*
The chart name, or nameOverride.
*/}}
{{- define "fanout.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified name of every object: fullnameOverride, else the release name when it already
contains the chart name (release "fanout" gives "fanout"), else "<release>-<chart>".
*/}}
{{- define "fanout.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "fanout.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: immutable once the DaemonSet exists, so they never carry versions.
*/}}
{{- define "fanout.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fanout.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object. The ServiceMonitor and PodMonitor take the scrape job name from
app.kubernetes.io/name (jobLabel), so with the default name every series has job="fanout".
*/}}
{{- define "fanout.labels" -}}
helm.sh/chart: {{ include "fanout.chart" . }}
{{ include "fanout.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The ServiceAccount the DaemonSet runs as.
*/}}
{{- define "fanout.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fanout.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image: repository:tag (tag defaults to the chart's appVersion), or
repository@digest when image.digest is set.
*/}}
{{- define "fanout.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Why each capability is there; the DaemonSet prints this next to every entry of
securityContext.capabilities.add. Keep in step with values.yaml and the kustomize base.
*/}}
{{- define "fanout.capabilityReasons" -}}
BPF: load programs and create maps
PERFMON: attach tracepoints and read kernel memory from tracing programs
NET_ADMIN: load and attach the cgroup_skb HTTP/2 request scanner, query conntrack over netlink
SYS_PTRACE: read other processes' /proc/<pid>/ns/net and fd links (startup recovery of every pod network namespace, owners of recovered connections), and /proc/1/root as a fallback to find the host cgroup2
DAC_READ_SEARCH: list /proc/<pid>/fd of processes of other users (owners of recovered connections of non-root pods)
{{- end }}
