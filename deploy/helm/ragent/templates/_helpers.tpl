{{/*
Names and labels.
*/}}
{{- define "ragent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ragent.fullname" -}}
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

{{- define "ragent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ragent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ragent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ragent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ragent.serviceAccountName" -}}
{{- default (include "ragent.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "ragent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The namespace of the agent's Events. They are about PrePull resources, which are
cluster-scoped, and the API server keeps Events about a cluster-scoped object in `default`
(agent/src/adapters/kube.rs).
*/}}
{{- define "ragent.eventsNamespace" -}}default{{- end -}}

{{/*
Where the agent reads its config file, and where registryAuth's Secret is mounted.
*/}}
{{- define "ragent.configPath" -}}/etc/ragent/config.toml{{- end -}}
{{- define "ragent.authPath" -}}/etc/ragent/registry-auth/.dockerconfigjson{{- end -}}

{{/*
The instance-type catalog of rightsizing.catalog: a key of the ConfigMap, mounted read-only
(the directory holds only that key).
*/}}
{{- define "ragent.catalogKey" -}}instance-types.toml{{- end -}}
{{- define "ragent.catalogDir" -}}/etc/ragent/catalog{{- end -}}
{{- define "ragent.catalogPath" -}}{{ include "ragent.catalogDir" . }}/{{ include "ragent.catalogKey" . }}{{- end -}}
{{- define "ragent.hasCatalog" -}}
{{- if and .Values.rightsizing.enabled .Values.rightsizing.catalog -}}true{{- end -}}
{{- end -}}

{{/*
Layer sharing (sharing.*): the headless Service whose EndpointSlices list the peers (a DNS
label, so at most 63 characters), the Secret with the peer token and where it is mounted, and
the spool directory (an emptyDir).
*/}}
{{- define "ragent.peersService" -}}
{{- printf "%s-peers" (include "ragent.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}
{{- define "ragent.peerTokenSecret" -}}
{{- default (printf "%s-peer-token" (include "ragent.fullname" .)) .Values.sharing.token.existingSecret -}}
{{- end -}}
{{- define "ragent.peerTokenDir" -}}/etc/ragent/peer-token{{- end -}}
{{- define "ragent.spoolDir" -}}/var/lib/ragent/spool{{- end -}}

{{/*
Value combinations values.schema.json cannot express, refused with what to change. Included by
the DaemonSet.
*/}}
{{- define "ragent.validate" -}}
{{- $s := .Values.sharing -}}
{{- if $s.enabled -}}
{{- if eq (int $s.port) (int .Values.agent.metricsPort) -}}
{{- fail (printf "sharing.port and agent.metricsPort are both %d: with sharing on the pod uses the node's network, give them different ports" (int $s.port)) -}}
{{- end -}}
{{- if and (kindIs "bool" .Values.kubernetes.enabled) (not .Values.kubernetes.enabled) -}}
{{- fail "sharing.enabled needs the kube side: the agents find each other in the peers Service's EndpointSlices; leave kubernetes.enabled unset or true" -}}
{{- end -}}
{{- $surge := dig "rollingUpdate" "maxSurge" 0 .Values.updateStrategy -}}
{{- if and $surge (ne (toString $surge) "0") (ne (toString $surge) "0%") -}}
{{- fail (printf "updateStrategy.rollingUpdate.maxSurge is %v: with sharing on the pods use the node's ports (hostNetwork), so a surge pod can never start beside the old one; leave maxSurge at 0" $surge) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The ConfigMap's data: the config file and, when set, the catalog. Its checksum is the pod
template's checksum/config annotation, so a change to either rolls the pods.
*/}}
{{- define "ragent.configMapData" -}}
config.toml: |
  {{- include "ragent.config" . | nindent 2 }}
{{- if include "ragent.hasCatalog" . }}
{{ include "ragent.catalogKey" . }}: |
  {{- .Values.rightsizing.catalog | trimSuffix "\n" | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The container's ports: one entry per port; each Service picks up the one it exposes (metrics:
the ServiceMonitor's Service; peer: the peers Service). With sharing on the pod is on the
node's network, so these are the node's ports too.
*/}}
{{- define "ragent.ports" -}}
- name: metrics
  containerPort: {{ int .Values.agent.metricsPort }}
  protocol: TCP
{{- if .Values.sharing.enabled }}
- name: peer
  containerPort: {{ int .Values.sharing.port }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/*
The host directories the agent uses, each defined once: the DaemonSet turns every entry into a
hostPath volume and a mount. Every one is read-only except two: the right-sizing checkpoint
directory, where the agent writes its usage history, and containerd's certs.d when sharing is
on, where it writes the mirror entries (README.md, "Host access, and why").
  name       volume name
  hostPath   where it is on the node
  mountPath  where the agent sees it
  type       the hostPath type kubelet checks before starting the pod
  readOnly   the mount's flag
*/}}
{{- define "ragent.hostMounts" -}}
- name: containerd
  hostPath: {{ dir .Values.containerd.socket }}
  mountPath: {{ dir .Values.containerd.socket }}
  type: Directory
  readOnly: true
- name: cgroup
  hostPath: {{ .Values.hostPaths.cgroup }}
  mountPath: /sys/fs/cgroup
  type: Directory
  readOnly: true
- name: bpffs
  hostPath: {{ .Values.hostPaths.bpffs }}
  mountPath: /sys/fs/bpf
  type: Directory
  readOnly: true
- name: tracefs
  hostPath: {{ .Values.hostPaths.tracefs }}
  mountPath: /sys/kernel/tracing
  type: Directory
  readOnly: true
{{- if .Values.hostPaths.btf }}
- name: btf
  hostPath: {{ .Values.hostPaths.btf }}
  mountPath: /sys/kernel/btf
  type: Directory
  readOnly: true
{{- end }}
{{- if .Values.rightsizing.enabled }}
- name: rightsizing
  hostPath: {{ .Values.rightsizing.checkpointHostPath }}
  mountPath: {{ .Values.rightsizing.checkpointHostPath }}
  type: DirectoryOrCreate
  readOnly: false
{{- end }}
{{- if .Values.sharing.enabled }}
- name: certs-d
  hostPath: {{ .Values.sharing.certsDir }}
  mountPath: {{ .Values.sharing.certsDir }}
  type: Directory
  readOnly: false
{{- end }}
{{- end -}}

{{/*
A value in TOML: strings (JSON string escapes are valid TOML), booleans, numbers and lists of
those. Helm reads every number of a values file as a float: a whole number is printed as a TOML
integer (which the agent also takes for a float field), any other as a TOML float.
*/}}
{{- define "ragent.toml.value" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- . -}}
{{- else if and (kindIs "float64" .) (ne (float64 (int64 .)) .) -}}
{{- toString . -}}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- int64 . -}}
{{- else if kindIs "slice" . -}}
[{{- range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "ragent.toml.value" $e }}{{ end -}}]
{{- else -}}
{{- fail (printf "ragent.toml.value: cannot write %v (%s) as TOML" . (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/*
One TOML table from (dict "name" NAME "pairs" (list (list KEY VALUE) ...)): only the keys whose
value is set (not null, not "", not an empty list); no table at all when none is.
*/}}
{{- define "ragent.toml.table" -}}
{{- $set := list -}}
{{- range .pairs -}}
{{- $v := index . 1 -}}
{{- $unset := or (kindIs "invalid" $v) (and (kindIs "string" $v) (eq $v "")) (and (kindIs "slice" $v) (empty $v)) -}}
{{- if not $unset -}}
{{- $set = append $set . -}}
{{- end -}}
{{- end -}}
{{- if $set }}

[{{ .name }}]
{{- range $set }}
{{ index . 0 }} = {{ include "ragent.toml.value" (index . 1) }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
A TOML table and its sub-tables from (dict "name" NAME "map" MAP): the map's scalar and list
values as the table's keys (as ragent.toml.table writes them), each map value as the sub-table
NAME.KEY. Keys are written as they are: values.schema.json admits only the config file's.
*/}}
{{- define "ragent.toml.tree" -}}
{{- $pairs := list -}}
{{- range $k, $v := .map -}}
{{- if not (kindIs "map" $v) -}}
{{- $pairs = append $pairs (list $k $v) -}}
{{- end -}}
{{- end -}}
{{- include "ragent.toml.table" (dict "name" .name "pairs" $pairs) -}}
{{- range $k, $v := .map -}}
{{- if kindIs "map" $v -}}
{{- include "ragent.toml.tree" (dict "name" (printf "%s.%s" $.name $k) "map" $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The agent's config file (docs/config.md), from the values.
*/}}
{{- define "ragent.config" -}}
{{- $v := .Values -}}
{{- $auth := "" -}}
{{- if $v.registryAuth.secretName -}}
{{- $auth = include "ragent.authPath" . -}}
{{- end -}}
# Rendered by the ragent Helm chart from its values; see docs/config.md.
containerd = {{ include "ragent.toml.value" $v.containerd.socket }}
namespace = {{ include "ragent.toml.value" $v.containerd.namespace }}
log_format = {{ include "ragent.toml.value" $v.log.format }}
{{- include "ragent.toml.table" (dict "name" "agent" "pairs" (list
  (list "metrics_addr" (printf "0.0.0.0:%d" (int $v.agent.metricsPort)))
  (list "ebpf" $v.agent.ebpf)
  (list "cgroup_root" $v.agent.cgroupRoot)
  (list "refresh_debounce_ms" $v.agent.refreshDebounceMs)
  (list "series_grace_s" $v.agent.seriesGraceSeconds)
)) }}
{{- $prepull := list
  (list "images" $v.prepull.images)
  (list "insecure_registries" $v.prepull.insecureRegistries)
  (list "concurrency" $v.prepull.concurrency)
  (list "max_rate" $v.prepull.maxRate)
  (list "refresh_interval_s" $v.prepull.refreshIntervalSeconds)
  (list "retry_max_s" $v.prepull.retryMaxSeconds)
}}
{{- if $v.prepull.images }}
{{- $prepull = append $prepull (list "auth" $auth) }}
{{- end }}
{{- include "ragent.toml.table" (dict "name" "prepull" "pairs" $prepull) }}
{{- $rebase := list
  (list "follow" $v.rebase.follow)
  (list "mode" $v.rebase.mode)
  (list "tag_suffix" $v.rebase.tagSuffix)
  (list "poll_interval_s" $v.rebase.pollIntervalSeconds)
  (list "retry_max_s" $v.rebase.retryMaxSeconds)
  (list "insecure_registries" $v.rebase.insecureRegistries)
}}
{{- if $v.rebase.follow }}
{{- $rebase = append $rebase (list "auth" $auth) }}
{{- end }}
{{- include "ragent.toml.table" (dict "name" "rebase" "pairs" $rebase) }}
{{- include "ragent.toml.table" (dict "name" "kubernetes" "pairs" (list
  (list "enabled" $v.kubernetes.enabled)
  (list "pull_secret_namespaces" (uniq $v.prepull.pullSecretNamespaces))
)) }}
{{- $rs := $v.rightsizing }}
{{- if $rs.enabled }}
{{- $catalog := "" }}
{{- if include "ragent.hasCatalog" . }}
{{- $catalog = include "ragent.catalogPath" . }}
{{- end }}
{{- include "ragent.toml.table" (dict "name" "rightsizing" "pairs" (list
  (list "enabled" true)
  (list "sample_interval_s" $rs.sampleIntervalSeconds)
  (list "checkpoint_dir" $rs.checkpointHostPath)
  (list "checkpoint_interval_s" $rs.checkpointIntervalSeconds)
  (list "catalog" $catalog)
)) }}
{{- include "ragent.toml.tree" (dict "name" "rightsizing.model" "map" ($rs.model | default dict)) }}
{{- include "ragent.toml.tree" (dict "name" "rightsizing.headroom" "map" ($rs.headroom | default dict)) }}
{{- else }}
{{- include "ragent.toml.table" (dict "name" "rightsizing" "pairs" (list (list "enabled" false))) }}
{{- end }}
{{- $sh := $v.sharing }}
{{- if $sh.enabled }}
{{- include "ragent.toml.table" (dict "name" "sharing" "pairs" (list
  (list "enabled" true)
  (list "peer_addr" (printf "0.0.0.0:%d" (int $sh.port)))
  (list "registries" $sh.registries)
  (list "public" $sh.public)
  (list "certs_dir" $sh.certsDir)
  (list "insecure_registries" $sh.insecureRegistries)
  (list "auth" $auth)
  (list "token_file" (printf "%s/token" (include "ragent.peerTokenDir" .)))
  (list "spool_dir" (include "ragent.spoolDir" .))
  (list "service" (include "ragent.peersService" .))
  (list "peer_timeout_ms" $sh.peerTimeoutMs)
  (list "keep_s" $sh.keepSeconds)
)) }}
{{- end }}
{{- end -}}
