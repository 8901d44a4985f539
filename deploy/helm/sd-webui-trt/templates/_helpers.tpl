{{/*
Names. The full name is at most 36 characters so that "<fullname>-build-<pool>" (pool names: at most 20)
stays within the 63 characters of a label value (a Job's name becomes its pods' job-name label).
*/}}
{{- define "sdtrt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sdtrt.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 36 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 36 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 36 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sdtrt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the release (every pool). */}}
{{- define "sdtrt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sdtrt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels. */}}
{{- define "sdtrt.labels" -}}
helm.sh/chart: {{ include "sdtrt.chart" . }}
{{ include "sdtrt.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sd-webui-trt
{{- end }}

{{/* Selector labels of one pool's serving pods: (dict "root" $ "pool" $pool) */}}
{{- define "sdtrt.poolSelectorLabels" -}}
{{ include "sdtrt.selectorLabels" .root }}
app.kubernetes.io/component: serving
sd-webui-trt/pool: {{ .pool.name }}
{{- end }}

{{/* Name of a pool's resources (Deployment, PDB, HPA, ScaledObject, per-pool Service): (dict "root" $ "pool" $pool) */}}
{{- define "sdtrt.poolFullname" -}}
{{- printf "%s-%s" (include "sdtrt.fullname" .root) .pool.name }}
{{- end }}

{{- define "sdtrt.prebuildJobName" -}}
{{- printf "%s-build-%s" (include "sdtrt.fullname" .root) .pool.name }}
{{- end }}

{{- define "sdtrt.planConfigMapName" -}}
{{- printf "%s-prebuild-plans" (include "sdtrt.fullname" .) }}
{{- end }}

{{/* A pool's image (image with pools[].image over it), JSON: (dict "root" $ "pool" $pool) */}}
{{- define "sdtrt.poolImage" -}}
{{- include "sdtrt.merge" (list .root.Values.image .pool.image) }}
{{- end }}

{{/* A pool's image reference: (dict "root" $ "pool" $pool) */}}
{{- define "sdtrt.image" -}}
{{- $image := include "sdtrt.poolImage" . | fromJson }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{/* Claim names. */}}
{{- define "sdtrt.modelsClaim" -}}
{{- default (printf "%s-models" (include "sdtrt.fullname" .)) .Values.models.existingClaim }}
{{- end }}

{{- define "sdtrt.enginesClaim" -}}
{{- default (printf "%s-engines" (include "sdtrt.fullname" .)) .Values.engines.existingClaim }}
{{- end }}

{{/*
Paths inside the image (deploy/docker/Dockerfile). The containers set no `command`: the image's ENTRYPOINT
(tini, then deploy/docker/entrypoint.sh) stays, so tini is PID 1 (forwards SIGTERM, reaps children) and the chart
passes only the mode (args: serve | prebuild).
*/}}
{{- define "sdtrt.extDir" -}}/opt/webui/extensions/sd-webui-trt{{- end }}
{{- define "sdtrt.probe" -}}{{ include "sdtrt.extDir" . }}/deploy/docker/probe.sh{{- end }}

{{/*
Where A1111 1.10.1 writes at run time, each an emptyDir (volume name -> path): /tmp (Gradio, Python), its tmp/
(a corrupt config.json or cache.json is moved there), cache/ (the diskcache of hashes: SD_WEBUI_CACHE_DIR's
default), outputs/ (saved images) and log/; with a read-only root also /var/lib/webui (config.json and
ui-config.json moved there by arguments).
*/}}
{{- define "sdtrt.writableDirs" -}}
{{- $dirs := dict "tmp" "/tmp" "webui-tmp" "/opt/webui/tmp" "webui-cache" "/opt/webui/cache" "webui-outputs" "/opt/webui/outputs" "webui-log" "/opt/webui/log" }}
{{- if .Values.webui.readOnlyRootFilesystem }}
{{- $_ := set $dirs "webui-state" "/var/lib/webui" }}
{{- end }}
{{- toJson $dirs }}
{{- end }}

{{/* A pool's effective prebuild settings: the prebuild section with pools[].prebuild over it (JSON). */}}
{{- define "sdtrt.poolPrebuild" -}}
{{- include "sdtrt.merge" (list .root.Values.prebuild .pool.prebuild) }}
{{- end }}

{{/* A pool's effective autoscaling settings (JSON). */}}
{{- define "sdtrt.poolAutoscaling" -}}
{{- include "sdtrt.merge" (list .root.Values.autoscaling .pool.autoscaling) }}
{{- end }}

{{/*
(list base override) -> JSON of base with override's keys over it, two levels deep (maps inside maps merge,
anything else, lists included, is replaced). Unlike sprig's mergeOverwrite, false, 0 and "" in the override win.
*/}}
{{- define "sdtrt.merge" -}}
{{- $out := deepCopy (index . 0) }}
{{- range $k, $v := (index . 1 | default dict) }}
{{- $cur := index $out $k }}
{{- if and (kindIs "map" $v) (kindIs "map" $cur) }}
{{- $inner := deepCopy $cur }}
{{- range $k2, $v2 := $v }}{{ $_ := set $inner $k2 $v2 }}{{ end }}
{{- $_ := set $out $k $inner }}
{{- else }}
{{- $_ := set $out $k $v }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Names of the pools whose pre-build is on (prebuild.enabled, or the pool's own prebuild.enabled), JSON list. */}}
{{- define "sdtrt.prebuildPools" -}}
{{- $names := list }}
{{- range $pool := .Values.pools }}
{{- $pb := include "sdtrt.poolPrebuild" (dict "root" $ "pool" $pool) | fromJson }}
{{- if $pb.enabled }}{{ $names = append $names $pool.name }}{{ end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* The backend a prebuild mode builds with. */}}
{{- define "sdtrt.backendOf" -}}
{{- if eq . "rtx" }}tensorrt-rtx{{ else }}tensorrt{{ end }}
{{- end }}

{{/*
A pool's pre-build plan, the JSON `python -m sdtrt prebuild` reads: every checkpoint with every profile, for the
pool's targets (rtx: ahead of time; tensorrt: the Job's own GPU, so no named targets).
*/}}
{{- define "sdtrt.plan" -}}
{{- $pb := include "sdtrt.poolPrebuild" . | fromJson }}
{{- $targets := list }}
{{- if eq $pb.mode "rtx" }}{{ $targets = .pool.targets | default list }}{{ end }}
{{- $builds := list }}
{{- range $pb.checkpoints }}
{{- $builds = append $builds (dict "checkpoint" . "profiles" $pb.profiles "backend" (include "sdtrt.backendOf" $pb.mode) "targets" $targets "controlnet" $pb.controlnet "refit" $pb.refit) }}
{{- end }}
{{- toPrettyJson (dict "builds" $builds) }}
{{- end }}

{{/*
Checks the schema cannot express; each fails the render (and `helm lint`) with a message.
*/}}
{{- define "sdtrt.validate" -}}
{{- $seen := dict }}
{{- range .Values.pools }}
{{- if hasKey $seen .name }}
{{- fail (printf "pools: the name %q is used twice; each pool needs its own name" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- $pool := . }}
{{- $as := include "sdtrt.poolAutoscaling" (dict "root" $ "pool" .) | fromJson }}
{{- if $as.enabled }}
{{- if lt (int $as.maxReplicas) (int $as.minReplicas) }}
{{- fail (printf "pools[%s].autoscaling: maxReplicas (%v) is below minReplicas (%v)" .name $as.maxReplicas $as.minReplicas) }}
{{- end }}
{{- if and (eq $as.kind "hpa") (lt (int $as.minReplicas) 1) }}
{{- fail (printf "pools[%s].autoscaling: an HPA needs minReplicas >= 1 (scale to zero needs kind: keda)" .name) }}
{{- end }}
{{- if and (eq $as.kind "keda") (empty $as.keda.triggers) }}
{{- fail (printf "pools[%s].autoscaling: kind keda needs keda.triggers (e.g. a prometheus trigger on the queue length)" .name) }}
{{- end }}
{{- if and (eq $as.kind "hpa") (empty $as.hpa.metrics) }}
{{- fail (printf "pools[%s].autoscaling: kind hpa needs hpa.metrics (a GPU or queue metric; CPU does not measure a WebUI's load)" .name) }}
{{- end }}
{{- end }}
{{- $pb := include "sdtrt.poolPrebuild" (dict "root" $ "pool" .) | fromJson }}
{{- if $pb.enabled }}
{{- if empty $pb.checkpoints }}
{{- fail (printf "prebuild.enabled: pool %s has no checkpoints to build (prebuild.checkpoints, e.g. [Stable-diffusion/sd15.safetensors])" .name) }}
{{- end }}
{{- if eq $pb.mode "rtx" }}
{{- if empty $pool.targets }}
{{- fail (printf "prebuild.mode rtx builds ahead of time on CPU nodes for named GPUs: pool %s needs targets (e.g. [sm89])" .name) }}
{{- end }}
{{- range $pool.targets }}
{{- if not (has . $pb.rtxTargets) }}
{{- fail (printf "pool %s: TensorRT-RTX does not build for %s (it builds for %s); give this pool prebuild: {mode: tensorrt}" $pool.name . (join ", " $pb.rtxTargets)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.ingress.enabled (empty .Values.ingress.hosts) }}
{{- fail "ingress.enabled needs ingress.hosts" }}
{{- end }}
{{- end }}
