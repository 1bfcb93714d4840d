{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{/*
Prefix of every object name. 47 characters at most: KubeRay names the RayClusters of
a RayService "<name>-<5 chars>" and rejects RayCluster names over 53 characters.
*/}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Labels that pick this release's Ray pods (set on every pod template).
*/}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/part-of: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Labels of the objects the chart creates.
*/}}
{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
The Ray container image.
*/}}
{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The application's args (serveConfig.application.args).
*/}}
{{- define "tandem.args" -}}
{{- toYaml .Values.serveConfig.application.args -}}
{{- end -}}

{{/*
The Serve config (the document `serve deploy` takes): serveConfig with its
`application` map turned back into config.yaml's one-element `applications` list, plus,
for each pinned pool, a `deployments` entry whose ray_actor_options are the pool's
num_cpus and num_gpus and 1 unit of the pool's Ray resource (Serve replaces a
deployment's ray_actor_options with the config's, so all three are given); for an
expert-parallel pool, the replica's placement group too (placement_group_bundles with the
pool resource in every bundle, placement_group_strategy). An entry the values already
have for that deployment keeps its own options, merged on top.
*/}}
{{- define "tandem.serveConfig" -}}
{{- $config := deepCopy .Values.serveConfig -}}
{{- $app := $config.application -}}
{{- $_ := unset $config "application" -}}
{{- $pins := dict -}}
{{- $order := list -}}
{{- range $pool := include "tandem.pinnedPools" . | fromJsonArray -}}
{{- $name := get $.Values.poolPinning.deployments $pool -}}
{{- if not $name -}}
{{- fail (printf "poolPinning.deployments.%s: name the Serve deployment that runs pool %s" $pool $pool) -}}
{{- end -}}
{{- $p := get $app.args.pools $pool -}}
{{- $resourceName := include "tandem.poolResource" (dict "root" $ "pool" $pool) -}}
{{- $resource := dict $resourceName 1 -}}
{{- $par := $p.parallel | default dict -}}
{{- if $par.enable_expert_parallel -}}
{{- /* An EP replica: bundle 0 the replica actor (cluster/parallel_settings.py
COORDINATOR_CPUS), one bundle per rank; every bundle takes a unit of the pool resource. */ -}}
{{- $rank := dict "CPU" $p.num_cpus $resourceName 1 -}}
{{- if gt (float64 $p.num_gpus) 0.0 -}}{{- $_ := set $rank "GPU" $p.num_gpus -}}{{- end -}}
{{- $bundles := list (dict "CPU" 0.1 $resourceName 1) -}}
{{- range until (int ($par.data_parallel_size | default 1)) -}}{{- $bundles = append $bundles (deepCopy $rank) -}}{{- end -}}
{{- $_ := set $pins $name (dict "ray_actor_options" (dict "num_cpus" 0.1 "num_gpus" 0 "resources" $resource)
    "placement_group_bundles" $bundles "placement_group_strategy" ($par.placement_strategy | default "PACK")) -}}
{{- else -}}
{{- $_ := set $pins $name (dict "ray_actor_options" (dict "num_cpus" $p.num_cpus "num_gpus" $p.num_gpus "resources" $resource)) -}}
{{- end -}}
{{- $order = append $order $name -}}
{{- end -}}
{{- if $order -}}
{{- $deployments := list -}}
{{- range $d := ($app.deployments | default list) -}}
{{- $d = deepCopy $d -}}
{{- if hasKey $pins $d.name -}}
{{- $pin := get $pins $d.name -}}
{{- $_ := set $d "ray_actor_options" (merge (deepCopy ($d.ray_actor_options | default dict)) $pin.ray_actor_options) -}}
{{- $d = merge $d (omit $pin "ray_actor_options") -}}
{{- $order = without $order $d.name -}}
{{- end -}}
{{- $deployments = append $deployments $d -}}
{{- end -}}
{{- range $name := $order -}}
{{- $deployments = append $deployments (merge (dict "name" $name) (get $pins $name)) -}}
{{- end -}}
{{- $_ := set $app "deployments" $deployments -}}
{{- end -}}
{{- $_ := set $config "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
What a pool asks Ray for in all, as JSON {"cpus": N, "gpus": N}: replicas x (num_cpus,
num_gpus), or for an expert-parallel pool replicas x (0.1 + data_parallel_size x
num_cpus, data_parallel_size x num_gpus). Call with the pool's settings.
*/}}
{{- define "tandem.poolNeed" -}}
{{- $par := .parallel | default dict -}}
{{- if $par.enable_expert_parallel -}}
{{- $dp := float64 ($par.data_parallel_size | default 1) -}}
{{- toJson (dict "cpus" (mulf .replicas (addf 0.1 (mulf $dp .num_cpus))) "gpus" (mulf .replicas (mulf $dp .num_gpus))) -}}
{{- else -}}
{{- toJson (dict "cpus" (mulf .replicas .num_cpus) "gpus" (mulf .replicas .num_gpus)) -}}
{{- end -}}
{{- end -}}

{{/*
Pools kept on their own worker group (poolPinning): the pools the app's mode uses whose
worker group of the same name is rendered, when poolPinning.resourcePrefix is set.
A JSON list of pool names.
*/}}
{{- define "tandem.pinnedPools" -}}
{{- $pinned := list -}}
{{- if .Values.poolPinning.resourcePrefix -}}
{{- range $pool := include "tandem.activePools" . | fromJsonArray -}}
{{- $group := get $.Values.workerGroups $pool -}}
{{- if and $group (eq (include "tandem.groupEnabled" (dict "root" $ "name" $pool "group" $group)) "true") -}}
{{- $pinned = append $pinned $pool -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $pinned -}}
{{- end -}}

{{/*
The Ray custom resource of a pool's worker group. Call with dict "root" $ "pool" NAME.
*/}}
{{- define "tandem.poolResource" -}}
{{- printf "%s%s" .root.Values.poolPinning.resourcePrefix .pool -}}
{{- end -}}

{{/*
rayStartParams `resources` of a worker group: the pool resource and the group's
rayResources, as the string KubeRay passes to `ray start --resources=` and its
autoscaler parses ("{\"name\": amount}", quotes included); "" when there are none.
Call with dict "root" $ "name" GROUPNAME "group" GROUPVALUES.
*/}}
{{- define "tandem.groupResources" -}}
{{- $v := .root.Values -}}
{{- $res := deepCopy (.group.rayResources | default dict) -}}
{{- if $v.poolPinning.resourcePrefix -}}
{{- $_ := set $res (include "tandem.poolResource" (dict "root" .root "pool" .name)) (int $v.poolPinning.unitsPerPod) -}}
{{- end -}}
{{- if $res -}}
{{- if hasKey (.group.rayStartParams | default dict) "resources" -}}
{{- fail (printf "workerGroups.%s.rayStartParams.resources: the chart renders this parameter (the pool resource and rayResources); put custom resources in workerGroups.%s.rayResources" .name .name) -}}
{{- end -}}
{{- printf "%q" (toJson $res) -}}
{{- end -}}
{{- end -}}

{{/*
Pools the app's mode uses, as a list of pool names.
*/}}
{{- define "tandem.activePools" -}}
{{- $mode := .Values.serveConfig.application.args.mode -}}
{{- if eq $mode "pd" -}}
{{- toJson (list "prefill" "decode") -}}
{{- else -}}
{{- toJson (list "colocated") -}}
{{- end -}}
{{- end -}}

{{/*
"true" when a pool the app's mode uses has `autoscaling` (Serve sizes it; the chart then
turns on KubeRay's autoscaler so the worker groups follow).
*/}}
{{- define "tandem.poolsAutoscale" -}}
{{- $scaled := false -}}
{{- range $pool := include "tandem.activePools" . | fromJsonArray -}}
{{- if (get $.Values.serveConfig.application.args.pools $pool | default dict).autoscaling -}}
{{- $scaled = true -}}
{{- end -}}
{{- end -}}
{{- $scaled -}}
{{- end -}}

{{/*
Pods of a worker group that `n` replicas of a pool fill (tandem.poolNeed's GPUs and
CPUs): by GPUs when the replicas ask for GPUs, else by the CPUs a pod advertises to
Ray; "" when neither says. Call with dict "pool" POOL "group" GROUP "n" N.
*/}}
{{- define "tandem.podsFor" -}}
{{- $need := include "tandem.poolNeed" (merge (dict "replicas" .n) (deepCopy .pool)) | fromJson -}}
{{- $cpus := include "tandem.rayCpus" (dict "params" (.group.rayStartParams | default dict) "resources" .group.resources) -}}
{{- if gt (float64 $need.gpus) 0.0 -}}
{{- if gt (int (.group.gpus | default 0)) 0 -}}
{{- ceil (divf $need.gpus (float64 .group.gpus)) | int -}}
{{- end -}}
{{- else if and (ne $cpus "") (gt (float64 $need.cpus) 0.0) (gt (float64 $cpus) 0.0) -}}
{{- ceil (divf $need.cpus (float64 $cpus)) | int -}}
{{- end -}}
{{- end -}}

{{/*
A worker group's pods as JSON {"min", "replicas", "max"}: its own minReplicas and
maxReplicas (null: `replicas`), except that for the group of an autoscaled pool of the
same name, null bounds come from the pool's min_replicas and max_replicas times what
each replica asks for, and `replicas` is kept within them.
Call with dict "root" $ "name" NAME "group" GROUP.
*/}}
{{- define "tandem.groupBounds" -}}
{{- $group := .group -}}
{{- $replicas := int $group.replicas -}}
{{- $min := int (ternary $group.replicas $group.minReplicas (kindIs "invalid" $group.minReplicas)) -}}
{{- $max := int (ternary $group.replicas $group.maxReplicas (kindIs "invalid" $group.maxReplicas)) -}}
{{- $p := get .root.Values.serveConfig.application.args.pools .name | default dict -}}
{{- if and $p.autoscaling (has .name (include "tandem.activePools" .root | fromJsonArray)) -}}
{{- $a := $p.autoscaling -}}
{{- if kindIs "invalid" $group.minReplicas -}}
{{- with include "tandem.podsFor" (dict "pool" $p "group" $group "n" ($a.min_replicas | default 1)) -}}
{{- $min = int . -}}
{{- end -}}
{{- end -}}
{{- if kindIs "invalid" $group.maxReplicas -}}
{{- with include "tandem.podsFor" (dict "pool" $p "group" $group "n" ($a.max_replicas | default 1)) -}}
{{- $max = int . -}}
{{- end -}}
{{- end -}}
{{- $replicas = max $min (min $max $replicas) -}}
{{- end -}}
{{- toJson (dict "min" $min "replicas" $replicas "max" $max) -}}
{{- end -}}

{{/*
"true" when worker group .name is rendered: `enabled` true/false, or auto (the
default), which follows the app's mode (pd: prefill and decode; colocated: colocated).
Call with dict "root" $ "name" NAME "group" GROUP.
*/}}
{{- define "tandem.groupEnabled" -}}
{{- $enabled := toString .group.enabled -}}
{{- if eq $enabled "auto" -}}
{{- has .name (include "tandem.activePools" .root | fromJsonArray) -}}
{{- else if or (eq $enabled "true") (eq $enabled "false") -}}
{{- $enabled -}}
{{- else -}}
{{- fail (printf "workerGroups.%s.enabled must be true, false or auto, not %q" .name $enabled) -}}
{{- end -}}
{{- end -}}

{{/*
A rayStartParams value as a string. Helm reads numbers in values as float64, so
integral numbers are printed without a fraction or exponent (8080, not 8080.0 or 1e+10).
*/}}
{{- define "tandem.paramString" -}}
{{- if kindIs "float64" . -}}
{{- if eq (float64 (int64 .)) . -}}{{ int64 . | toString }}{{- else -}}{{ toString . }}{{- end -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/*
rayStartParams rendered as a map of quoted strings.
Call with dict "params" MAP.
*/}}
{{- define "tandem.rayStartParams" -}}
{{- range $key, $value := .params }}
{{ $key }}: {{ include "tandem.paramString" $value | quote }}
{{- end -}}
{{- end -}}

{{/*
A CPU quantity ("4", 4, "500m") as a float number of cores; "" when unset.
*/}}
{{- define "tandem.cpuCores" -}}
{{- if not (kindIs "invalid" .) -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- divf (float64 (trimSuffix "m" $q)) 1000 -}}
{{- else -}}
{{- float64 $q -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Ray CPUs of a pod: rayStartParams num-cpus if set, else the container's CPU limit, else
its request (what KubeRay passes to `ray start`). "" when none is set.
Call with dict "params" RAYSTARTPARAMS "resources" RESOURCES.
*/}}
{{- define "tandem.rayCpus" -}}
{{- $params := .params | default dict -}}
{{- $res := .resources | default dict -}}
{{- if hasKey $params "num-cpus" -}}
{{- include "tandem.cpuCores" (get $params "num-cpus") -}}
{{- else if hasKey ($res.limits | default dict) "cpu" -}}
{{- include "tandem.cpuCores" $res.limits.cpu -}}
{{- else if hasKey ($res.requests | default dict) "cpu" -}}
{{- include "tandem.cpuCores" $res.requests.cpu -}}
{{- end -}}
{{- end -}}

{{/*
Container resources with `gpus` GPUs added to requests and limits.
Call with dict "resources" RESOURCES "gpus" N "gpuResourceName" NAME.
*/}}
{{- define "tandem.resources" -}}
{{- $res := deepCopy (.resources | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := $res.limits | default dict -}}
{{- $requests := $res.requests | default dict -}}
{{- $_ := set $limits .gpuResourceName (int .gpus) -}}
{{- $_ := set $requests .gpuResourceName (int .gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/*
The model volume, or nothing when model.type is none.
*/}}
{{- define "tandem.modelVolume" -}}
{{- $m := .Values.model -}}
{{- if eq $m.type "pvc" -}}
{{- if not $m.pvc.claimName -}}
{{- fail "model.type is pvc: set model.pvc.claimName to the PersistentVolumeClaim that holds the model" -}}
{{- end }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.type "hostPath" -}}
{{- if not $m.hostPath.path -}}
{{- fail "model.type is hostPath: set model.hostPath.path to the node directory that holds the model" -}}
{{- end }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: {{ $m.hostPath.type }}
{{- else if ne $m.type "none" -}}
{{- fail (printf "model.type must be none, pvc or hostPath, not %q" $m.type) -}}
{{- end -}}
{{- end -}}

{{/*
A probe: the group's own probe when set, else an HTTP GET on `path`:`port` with the
timings in .timings. Call with dict "probe" OWN "timings" TIMINGS "path" P "port" N.
*/}}
{{- define "tandem.probe" -}}
{{- if .probe -}}
{{- toYaml .probe -}}
{{- else -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{ toYaml .timings }}
{{- end -}}
{{- end -}}

{{/*
The pod template of a Ray node. Call with dict "root" $ "node" GROUPVALUES
"kind" ("head" or "worker") "pool" GROUPNAME.
*/}}
{{- define "tandem.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $node := .node -}}
{{- $isHead := eq .kind "head" -}}
{{- $headOnly := eq (toString $v.serveConfig.proxy_location) "HeadOnly" -}}
{{- $servePort := int $v.serveConfig.http_options.port -}}
metadata:
  labels:
    {{- include "tandem.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ if $isHead }}ray-head{{ else }}ray-worker{{ end }}
    {{- with $v.common.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $node.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := merge (deepCopy ($node.podAnnotations | default dict)) ($v.common.podAnnotations | default dict) }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.common.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ if $isHead }}ray-head{{ else }}ray-worker{{ end }}
      image: {{ include "tandem.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- if $isHead }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- end }}
        {{- if or $isHead (not $headOnly) }}
        - name: serve
          containerPort: {{ $servePort }}
        {{- end }}
        - name: metrics
          containerPort: {{ int $v.metricsPort }}
      {{- $env := concat ($v.common.env | default list) ($node.env | default list) }}
      {{- with $env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "tandem.resources" (dict "resources" $node.resources "gpus" ($node.gpus | default 0) "gpuResourceName" $v.gpuResourceName) | nindent 8 }}
      livenessProbe:
        {{- include "tandem.probe" (dict "probe" $node.livenessProbe "timings" $v.probes.liveness "path" "/api/healthz" "port" (int $v.dashboardAgentPort)) | nindent 8 }}
      readinessProbe:
        {{- if or $isHead $headOnly }}
        {{- include "tandem.probe" (dict "probe" $node.readinessProbe "timings" $v.probes.readiness "path" "/api/healthz" "port" (int $v.dashboardAgentPort)) | nindent 8 }}
        {{- else }}
        {{- include "tandem.probe" (dict "probe" $node.readinessProbe "timings" $v.probes.readiness "path" "/-/healthz" "port" $servePort) | nindent 8 }}
        {{- end }}
      {{- with $node.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: shm
          mountPath: /dev/shm
        {{- if ne $v.model.type "none" }}
        - name: model
          mountPath: {{ $v.model.mountPath }}
          readOnly: true
        {{- end }}
        {{- with $v.common.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $node.shmSize }}
    {{- with include "tandem.modelVolume" $root | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $v.common.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $nodeSelector := deepCopy ($node.nodeSelector | default dict) }}
  {{- if and (not $isHead) $v.poolPinning.nodeLabel }}
  {{- $nodeSelector = merge $nodeSelector (dict $v.poolPinning.nodeLabel .pool) }}
  {{- end }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $node.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $node.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
