{{/* Chart name. */}}
{{- define "moecluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, plus the chart name unless the release name contains it. */}}
{{- define "moecluster.fullname" -}}
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

{{/* Labels of every object. */}}
{{- define "moecluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moecluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select this release's Ray pods. */}}
{{- define "moecluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moecluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moecluster.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The custom Ray resource each serving replica asks for one unit of: the head offers one, each pod of the serving
group (servingGroup) servingGroup.replicasPerPod. It keeps the serving replicas off the expert groups' pods.
*/}}
{{- define "moecluster.servingResource" -}}
moecluster-serving
{{- end }}

{{/* `rayStartParams.resources` offering `n` units of the serving resource (KubeRay's quoted JSON); a dict: root, n. */}}
{{- define "moecluster.servingResourceParam" -}}
{{- printf "\"{\\\"%s\\\": %d}\"" (include "moecluster.servingResource" .root) (int .n) | squote }}
{{- end }}

{{/*
How a change of each `serve` field reaches the cluster, as JSON (files/fields.json, generated from cluster/config.py
by hack/generate.py): live (the deployment's user_config), scaling (Serve's num_replicas / autoscaling_config),
worker_limits (the `limits` keys that, like every field in neither list, belong to the version: the application's
args), autoscaling_defaults (ServeConfig's). Read it with `include "moecluster.fields" . | fromJson`.
*/}}
{{- define "moecluster.fields" -}}
{{- $fields := .Files.Get "files/fields.json" }}
{{- if not $fields }}
{{- fail "files/fields.json is missing: run python helm/moecluster/hack/generate.py" }}
{{- end }}
{{- $fields }}
{{- end }}

{{/*
The Serve application's args: the version's fields of `serve` (neither live nor scaling) and, of `limits`, only the
worker limits; `model` defaults to the mount path. Serve hashes the args into the code version, so any change of
them rolls out a new version: live values must stay out of them (a change of those leaves the args identical).
*/}}
{{- define "moecluster.serveArgs" -}}
{{- $fields := include "moecluster.fields" . | fromJson }}
{{- $args := dict }}
{{- range $key, $value := .Values.serve }}
{{- if and (not (has $key $fields.live)) (not (has $key $fields.scaling)) }}
{{- $_ := set $args $key $value }}
{{- end }}
{{- end }}
{{- if and (not $args.model) (ne .Values.modelStorage.type "embedded") }}
{{- $_ := set $args "model" .Values.modelStorage.mountPath }}
{{- end }}
{{- $limits := dict }}
{{- if kindIs "map" .Values.serve.limits }}
{{- range $key, $value := .Values.serve.limits }}
{{- if has $key $fields.worker_limits }}
{{- $_ := set $limits $key $value }}
{{- end }}
{{- end }}
{{- end }}
{{- if $limits }}
{{- $_ := set $args "limits" $limits }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
The deployment's user_config: the live fields set in `serve` (of `limits`, all but the worker limits), which every
serving replica applies in place (its reconfigure); empty when none is set.
*/}}
{{- define "moecluster.serveUserConfig" -}}
{{- $fields := include "moecluster.fields" . | fromJson }}
{{- $live := dict }}
{{- range $key, $value := .Values.serve }}
{{- if and (has $key $fields.live) (ne $key "limits") }}
{{- $_ := set $live $key $value }}
{{- end }}
{{- end }}
{{- $limits := dict }}
{{- if kindIs "map" .Values.serve.limits }}
{{- range $key, $value := .Values.serve.limits }}
{{- if not (has $key $fields.worker_limits) }}
{{- $_ := set $limits $key $value }}
{{- end }}
{{- end }}
{{- end }}
{{- if $limits }}
{{- $_ := set $live "limits" $limits }}
{{- end }}
{{- if $live }}
{{- toYaml $live }}
{{- end }}
{{- end }}

{{/*
Serve's options for the number of serving replicas: autoscaling_config from `serve.autoscaling` (its unset keys take
ServeConfig's defaults, not Serve's) when set, else num_replicas. ServeConfig refuses both (so does the schema).
*/}}
{{- define "moecluster.serveScaling" -}}
{{- $serve := .Values.serve }}
{{- $replicas := $serve.num_replicas | default 1 | int }}
{{- if kindIs "map" $serve.autoscaling }}
{{- if gt $replicas 1 }}
{{- fail (printf "serve: set num_replicas (%d) or autoscaling, not both" $replicas) }}
{{- end }}
{{- $fields := include "moecluster.fields" . | fromJson }}
{{- $scaling := mergeOverwrite (deepCopy $fields.autoscaling_defaults) (deepCopy $serve.autoscaling) }}
{{- if lt (float64 $scaling.max_replicas) (float64 $scaling.min_replicas) }}
{{- fail (printf "serve.autoscaling: max_replicas (%v) is below min_replicas (%v)" $scaling.max_replicas $scaling.min_replicas) }}
{{- end }}
autoscaling_config:
  {{- toYaml $scaling | nindent 2 }}
{{- else }}
num_replicas: {{ $replicas }}
{{- end }}
{{- end }}

{{/*
Ray Serve's config (serveConfigV2): HTTP on 8000, the gRPC ingress on 9000, the application. How a change reaches
the cluster: the args (version fields) roll out a new version; user_config (live fields) is applied in place by
every replica; num_replicas / autoscaling_config are Serve's own and add or remove replicas.
*/}}
{{- define "moecluster.serveConfig" -}}
http_options:
  host: 0.0.0.0
  port: 8000
grpc_options:
  port: 9000
  grpc_servicer_functions:
    - cluster.serving.grpc_api.add_inference_servicer
    - grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server
    - cluster.serving.grpc_api.add_reflection_v1
applications:
  - name: moecluster
    route_prefix: /
    import_path: cluster.serving.app:build
    args:
      {{- include "moecluster.serveArgs" . | nindent 6 }}
    deployments:
      - name: MoEServer
        {{- include "moecluster.serveScaling" . | trim | nindent 8 }}
        {{- with include "moecluster.serveUserConfig" . }}
        user_config:
          {{- . | nindent 10 }}
        {{- end }}
        ray_actor_options:
          num_cpus: 1
          {{- with .Values.serve.serving_gpus }}
          num_gpus: {{ . }}
          {{- end }}
          resources:
            {{ include "moecluster.servingResource" . }}: 1
{{- end }}

{{/* The model volume's source. */}}
{{- define "moecluster.modelVolume" -}}
{{- $storage := .Values.modelStorage }}
{{- if eq $storage.type "pvc" }}
persistentVolumeClaim:
  claimName: {{ $storage.pvc.existingClaim | default (printf "%s-models" (include "moecluster.fullname" .)) }}
  readOnly: true
{{- else if eq $storage.type "hostPath" }}
hostPath:
  path: {{ $storage.hostPath.path }}
  type: {{ $storage.hostPath.type }}
{{- else if eq $storage.type "download" }}
emptyDir:
  sizeLimit: {{ $storage.download.sizeLimit }}
{{- else }}
emptyDir: {}
{{- end }}
{{- end }}

{{/* The init container that fills the model volume (demo and download storage), or nothing. */}}
{{- define "moecluster.modelInitContainers" -}}
{{- $storage := .Values.modelStorage }}
{{- if has $storage.type (list "demo" "download") }}
initContainers:
  - name: model
    image: {{ include "moecluster.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    {{- if eq $storage.type "demo" }}
    command: ["moecluster", "init-model", {{ $storage.mountPath | quote }}, "--arch", {{ $storage.demo.arch | quote }}, "--seed", {{ $storage.demo.seed | quote }}]
    env:
      {{- include "moecluster.cacheEnv" (dict "root" . "env" list) | nindent 6 }}
    {{- else }}
    command:
      - python
      - -c
      - |
        import sys
        from huggingface_hub import snapshot_download
        snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3])
      - {{ $storage.download.repoId | quote }}
      - {{ $storage.download.revision | quote }}
      - {{ $storage.mountPath | quote }}
    env:
      {{- include "moecluster.cacheEnv" (dict "root" . "env" $storage.download.env) | nindent 6 }}
      {{- with $storage.download.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with $storage.download.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- end }}
    volumeMounts:
      - name: model
        mountPath: {{ $storage.mountPath }}
      {{- include "moecluster.scratchMounts" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
Writable scratch space. The root filesystem of every container is read-only (securityContext), so Ray and Python
write to two emptyDirs: /tmp (Ray's session directory /tmp/ray, Python's temporary files) and the `ray` user's
cache directory, where the cache variables of moecluster, Hugging Face and Triton point.
*/}}
{{- define "moecluster.cacheDir" -}}
/home/ray/.cache
{{- end }}

{{/* An emptyDir source with an optional size limit (the parameter). */}}
{{- define "moecluster.emptyDir" -}}
{{- if . }}{sizeLimit: {{ . }}}{{ else }}{}{{ end }}
{{- end }}

{{- define "moecluster.scratchVolumes" -}}
- name: tmp
  emptyDir: {{ include "moecluster.emptyDir" .Values.scratch.tmp.sizeLimit }}
- name: cache
  emptyDir: {{ include "moecluster.emptyDir" .Values.scratch.cache.sizeLimit }}
{{- end }}

{{- define "moecluster.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ include "moecluster.cacheDir" . }}
{{- end }}

{{/* The cache variables, into the cache emptyDir; a dict: root, env (the container's other env, which wins). */}}
{{- define "moecluster.cacheEnv" -}}
{{- $taken := list }}
{{- range .env }}
{{- $taken = append $taken .name }}
{{- end }}
{{- $cache := include "moecluster.cacheDir" .root }}
{{- $vars := list }}
{{- range $name, $sub := dict "XDG_CACHE_HOME" "" "HF_HOME" "/huggingface" "MOECLUSTER_CACHE" "/moecluster" "TRITON_CACHE_DIR" "/triton" }}
{{- if not (has $name $taken) }}
{{- $vars = append $vars (dict "name" $name "value" (printf "%s%s" $cache $sub)) }}
{{- end }}
{{- end }}
{{- with $vars }}{{ toYaml . }}{{ end }}
{{- end }}

{{/*
Ray token authentication: KubeRay's authOptions. KubeRay adds RAY_AUTH_MODE and RAY_AUTH_TOKEN (secretKeyRef, key
auth_token) to every Ray container, but keeps a container's own value of either: `env` must not set them.
*/}}
{{- define "moecluster.authOptions" -}}
{{- if .Values.rayAuth.enabled }}
{{- if semverCompare "<2.52.0-0" .Values.rayVersion }}
{{- fail (printf "rayAuth.enabled needs Ray 2.52.0 or newer (token authentication); rayVersion is %s" .Values.rayVersion) }}
{{- end }}
{{- range concat (.Values.env | default list) (.Values.autoscaling.options.env | default list) }}
{{- if has .name (list "RAY_AUTH_MODE" "RAY_AUTH_TOKEN" "RAY_AUTH_TOKEN_PATH") }}
{{- fail (printf "env sets %s, which rayAuth (KubeRay's authOptions) sets: use rayAuth.tokenSecret.name, or rayAuth.enabled=false" .name) }}
{{- end }}
{{- end }}
authOptions:
  mode: token
  {{- with .Values.rayAuth.tokenSecret.name }}
  secretName: {{ . | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/* KubeRay's autoscalerOptions: the sidecar gets the containers' securityContext and /tmp; the values override. */}}
{{- define "moecluster.autoscalerOptions" -}}
{{- $defaults := dict "securityContext" (deepCopy .Values.securityContext) "volumeMounts" (list (dict "name" "tmp" "mountPath" "/tmp")) }}
{{- toYaml (mergeOverwrite $defaults (deepCopy .Values.autoscaling.options)) }}
{{- end }}

{{/*
A Ray pod template. Parameters (a dict): root (the chart's context), group (head or expert group values),
container (ray-head or ray-worker), component (a label value), extraLabels (a dict), ports (a list).
*/}}
{{- define "moecluster.podTemplate" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $storage := $root.Values.modelStorage }}
{{- $resources := deepCopy ($group.resources | default dict) }}
{{- if $group.gpus }}
{{- $limits := deepCopy ($resources.limits | default dict) }}
{{- $_ := set $limits ($group.gpuResourceName | default "nvidia.com/gpu") $group.gpus }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
metadata:
  labels:
    {{- include "moecluster.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with .extraLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $group.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with include "moecluster.modelInitContainers" $root | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "moecluster.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      env:
        # cluster/node_env.py: Serve's proxies reach the replica over gRPC, not Ray actor calls.
        - name: RAY_SERVE_PROXY_USE_GRPC
          value: "1"
        # cluster/node_env.py's ACTOR_ENV, node-wide: the deployment's ray_actor_options replace the decorator's
        # runtime_env, so the serving replica gets it from here.
        - name: OMP_WAIT_POLICY
          value: PASSIVE
        {{- with $root.Values.auth.apiKeySecret }}
        # cluster/serving/auth.py: the API key clients must send.
        - name: MOECLUSTER_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ . | quote }}
              key: {{ $root.Values.auth.apiKeySecretKey | quote }}
        {{- end }}
        {{- include "moecluster.cacheEnv" (dict "root" $root "env" $root.Values.env) | nindent 8 }}
        {{- with $root.Values.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        {{- if ne $storage.type "embedded" }}
        - name: model
          mountPath: {{ $storage.mountPath }}
          readOnly: true
          {{- if and (eq $storage.type "pvc") $storage.pvc.subPath }}
          subPath: {{ $storage.pvc.subPath }}
          {{- end }}
        {{- end }}
        {{- include "moecluster.scratchMounts" $root | nindent 8 }}
  volumes:
    {{- if ne $storage.type "embedded" }}
    - name: model
      {{- include "moecluster.modelVolume" $root | trim | nindent 6 }}
    {{- end }}
    {{- include "moecluster.scratchVolumes" $root | nindent 4 }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
