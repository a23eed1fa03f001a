{{/* Names and labels. */}}
{{- define "rtdiff.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rtdiff.fullname" -}}
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

{{- define "rtdiff.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rtdiff.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rtdiff.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rtdiff.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pods that run the gateway (the head in kuberay mode) and pods that only hold engine ranks. */}}
{{- define "rtdiff.gatewaySelector" -}}
{{ include "rtdiff.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "rtdiff.workerSelector" -}}
{{ include "rtdiff.selectorLabels" . }}
app.kubernetes.io/component: gpu-worker
{{- end -}}

{{- define "rtdiff.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* GPUs of one replica of model `.`. */}}
{{- define "rtdiff.ranks" -}}
{{- mul (default 1 .tp) (default 1 .cfg_parallel) -}}
{{- end -}}

{{/* GPUs that all models' replicas need together. */}}
{{- define "rtdiff.totalGpus" -}}
{{- $total := 0 -}}
{{- range .Values.models -}}
{{- $total = add $total (mul (default 1 .replicas) (include "rtdiff.ranks" .)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* Worker pods for kuberay mode: each model's replicas packed on their own pods, so every
replica's GPUs share a node (its placement group is STRICT_PACK). */}}
{{- define "rtdiff.workerReplicas" -}}
{{- if gt (int .Values.ray.workers.replicas) 0 -}}
{{- .Values.ray.workers.replicas -}}
{{- else -}}
{{- $perWorker := int .Values.ray.workers.gpusPerWorker -}}
{{- $pods := 0 -}}
{{- range .Values.models -}}
{{- $gpus := mul (default 1 .replicas) (include "rtdiff.ranks" .) -}}
{{- $pods = add $pods (div (add $gpus (sub $perWorker 1)) $perWorker) -}}
{{- end -}}
{{- $pods -}}
{{- end -}}
{{- end -}}

{{/* Checks that need more than one value, which values.schema.json cannot express. */}}
{{- define "rtdiff.validate" -}}
{{- if eq (int .Values.ports.grpc) (int .Values.ports.metrics) -}}
{{- fail (printf "ports.metrics: must differ from ports.grpc (both %v)" .Values.ports.grpc) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (ne .Values.mode "plain") -}}
{{- fail "autoscaling.enabled: needs mode=plain; in kuberay mode the gateway starts a fixed number of replicas (models[].replicas), so scale those instead" -}}
{{- end -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) -}}
{{- fail (printf "autoscaling.minReplicas: %v is more than autoscaling.maxReplicas (%v)" .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) -}}
{{- end -}}
{{- $needed := int (include "rtdiff.totalGpus" .) -}}
{{- if and (eq .Values.mode "plain") (gt (int .Values.plain.gpus) 0) (lt (int .Values.plain.gpus) $needed) -}}
{{- fail (printf "plain.gpus: %v GPUs per pod, the models' replicas need %d" .Values.plain.gpus $needed) -}}
{{- end -}}
{{- if eq .Values.mode "kuberay" -}}
{{- range $i, $m := .Values.models -}}
{{- $ranks := int (include "rtdiff.ranks" $m) -}}
{{- if ne (mod (int $.Values.ray.workers.gpusPerWorker) $ranks) 0 -}}
{{- fail (printf "ray.workers.gpusPerWorker: %v is not a multiple of models[%d]'s tp x cfg_parallel = %d; a replica's GPUs must share one worker pod" $.Values.ray.workers.gpusPerWorker $i $ranks) -}}
{{- end -}}
{{- end -}}
{{- $have := mul (int (include "rtdiff.workerReplicas" .)) (int .Values.ray.workers.gpusPerWorker) -}}
{{- if lt $have $needed -}}
{{- fail (printf "ray.workers.replicas: %v worker pods hold %d GPUs, the models' replicas need %d" .Values.ray.workers.replicas $have $needed) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One TOML value. Helm reads every number in a values file as a float: integral ones are
written as integers, which the server's float fields accept too. */}}
{{- define "rtdiff.tomlValue" -}}
{{- $kind := kindOf . -}}
{{- if eq $kind "string" -}}
{{- toJson . -}}
{{- else if eq $kind "bool" -}}
{{- . -}}
{{- else if eq $kind "float64" -}}
{{- if eq (floor .) . -}}{{- int64 . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else if has $kind (list "int" "int64" "int32") -}}
{{- . -}}
{{- else -}}
{{- fail (printf "cannot write %v (%s) into the server config" . $kind) -}}
{{- end -}}
{{- end -}}

{{/* The server config file: rtdiff serve --config reads it (rtdiff_cluster/config.py). */}}
{{- define "rtdiff.serverConfig" -}}
# Rendered by the rtdiff-cluster chart; keys as in deploy/config.example.toml.
host = "0.0.0.0"
port = {{ int .Values.ports.grpc }}
metrics_port = {{ int .Values.ports.metrics }}
ray_address = {{ ternary "auto" "" (eq .Values.mode "kuberay") | quote }}
{{- range $key, $value := .Values.server }}
{{ $key }} = {{ include "rtdiff.tomlValue" $value }}
{{- end }}

[batching]
{{- range $key, $value := .Values.batching }}
{{ $key }} = {{ include "rtdiff.tomlValue" $value }}
{{- end }}
{{- range .Values.models }}
{{- $model := . }}
{{- if and (eq $.Values.mode "kuberay") (not (hasKey $model "num_gpus")) (ne (default "auto" $model.device) "cpu") }}
{{- $model = merge (dict "num_gpus" 1) $model }}
{{- end }}

[[models]]
{{- range $key, $value := $model }}
{{- if ne (kindOf $value) "map" }}
{{ $key }} = {{ include "rtdiff.tomlValue" $value }}
{{- end }}
{{- end }}
{{- /* Sub-tables (fast_paths, stream_cache) after the scalars: TOML puts [models.x] in the last [[models]]. */}}
{{- range $table, $fields := $model }}
{{- if eq (kindOf $fields) "map" }}
[models.{{ $table }}]
{{- range $key, $value := $fields }}
{{ $key }} = {{ include "rtdiff.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Where the pods see their files. */}}
{{- define "rtdiff.configDir" -}}/etc/rtdiff/config{{- end -}}
{{- define "rtdiff.tlsDir" -}}/etc/rtdiff/tls{{- end -}}
{{- define "rtdiff.clientCADir" -}}/etc/rtdiff/client-ca{{- end -}}
{{- define "rtdiff.probeClientDir" -}}/etc/rtdiff/probe-client{{- end -}}
{{- define "rtdiff.authDir" -}}/etc/rtdiff/auth{{- end -}}
{{- define "rtdiff.probeDir" -}}/etc/rtdiff/probe{{- end -}}

{{/* Arguments of `rtdiff serve`: the config file, then TLS and token files from their secrets. */}}
{{- define "rtdiff.serveArgs" -}}
{{- $args := list "--config" (printf "%s/config.toml" (include "rtdiff.configDir" .)) -}}
{{- if .Values.tls.enabled -}}
{{- $args = concat $args (list "--tls-cert" (printf "%s/tls.crt" (include "rtdiff.tlsDir" .)) "--tls-key" (printf "%s/tls.key" (include "rtdiff.tlsDir" .))) -}}
{{- if .Values.tls.mutual -}}
{{- $args = concat $args (list "--tls-client-ca" (printf "%s/ca.crt" (include "rtdiff.clientCADir" .))) -}}
{{- end -}}
{{- end -}}
{{- if .Values.auth.enabled -}}
{{- $args = concat $args (list "--auth-token-file" (printf "%s/%s" (include "rtdiff.authDir" .) .Values.auth.key)) -}}
{{- end -}}
{{- toJson $args -}}
{{- end -}}

{{/* Health probes of the gateway container. It answers grpc.health.v1 at once with NOT_SERVING
and turns SERVING once every replica has loaded: startup covers the load, readiness gates
traffic, liveness restarts a gateway that stopped answering. */}}
{{- define "rtdiff.probeAction" -}}
{{- if .Values.tls.enabled -}}
exec:
  command:
    - python
    - {{ include "rtdiff.probeDir" . }}/grpc_health_check.py
    - --port={{ int .Values.ports.grpc }}
    - --tls-dir={{ include "rtdiff.tlsDir" . }}
    - --server-name={{ default (printf "%s.%s.svc" (include "rtdiff.fullname" .) .Release.Namespace) .Values.tls.serverName }}
    {{- if .Values.tls.mutual }}
    - --client-dir={{ ternary (include "rtdiff.probeClientDir" .) (include "rtdiff.tlsDir" .) (ne .Values.tls.probeClientSecretName "") }}
    {{- end }}
    - --timeout={{ sub (int .Values.probes.timeoutSeconds) 1 | max 1 }}
{{- else -}}
grpc:
  port: {{ int .Values.ports.grpc }}
{{- end -}}
{{- end -}}

{{- define "rtdiff.probes" -}}
{{- $p := .Values.probes -}}
startupProbe:
  {{- include "rtdiff.probeAction" . | nindent 2 }}
  periodSeconds: {{ int $p.startupPeriodSeconds }}
  timeoutSeconds: {{ int $p.timeoutSeconds }}
  failureThreshold: {{ div (add (int $p.startupBudgetSeconds) (sub (int $p.startupPeriodSeconds) 1)) (int $p.startupPeriodSeconds) }}
readinessProbe:
  {{- include "rtdiff.probeAction" . | nindent 2 }}
  periodSeconds: {{ int $p.readinessPeriodSeconds }}
  timeoutSeconds: {{ int $p.timeoutSeconds }}
  failureThreshold: 2
livenessProbe:
  {{- include "rtdiff.probeAction" . | nindent 2 }}
  periodSeconds: {{ int $p.livenessPeriodSeconds }}
  timeoutSeconds: {{ int $p.timeoutSeconds }}
  failureThreshold: {{ int $p.livenessFailureThreshold }}
{{- end -}}

{{/* The gateway drains for drain_timeout_s after SIGTERM; the kubelet must wait longer. */}}
{{- define "rtdiff.terminationGracePeriod" -}}
{{- add (int (ceil (default 30 .Values.server.drain_timeout_s))) 15 -}}
{{- end -}}

{{- define "rtdiff.env" -}}
# The root filesystem is read-only; caches (Triton, torch, Ray) go to the /tmp emptyDir.
- name: HOME
  value: /tmp
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every rtdiff pod has: scratch, shared memory and the model files. */}}
{{- define "rtdiff.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSizeLimit }}
{{- if eq .Values.modelStorage.type "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.modelStorage.claimName }}
    readOnly: true
{{- else if eq .Values.modelStorage.type "hostPath" }}
- name: models
  hostPath:
    path: {{ .Values.modelStorage.hostPath }}
    type: Directory
{{- end }}
{{- end -}}

{{- define "rtdiff.commonMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- if ne .Values.modelStorage.type "none" }}
- name: models
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes only the gateway has: its config, TLS and token secrets, the TLS probe. */}}
{{- define "rtdiff.gatewayVolumes" -}}
- name: config
  configMap:
    name: {{ include "rtdiff.fullname" . }}-config
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
- name: probe
  configMap:
    name: {{ include "rtdiff.fullname" . }}-probe
{{- if .Values.tls.mutual }}
- name: client-ca
  secret:
    secretName: {{ default .Values.tls.secretName .Values.tls.clientCASecretName }}
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.crt}
{{- if .Values.tls.probeClientSecretName }}
- name: probe-client
  secret:
    secretName: {{ .Values.tls.probeClientSecretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ .Values.auth.secretName }}
    defaultMode: 0440
    items:
      - {key: {{ .Values.auth.key }}, path: {{ .Values.auth.key }}}
{{- end }}
{{- end -}}

{{- define "rtdiff.gatewayMounts" -}}
- name: config
  mountPath: {{ include "rtdiff.configDir" . }}
  readOnly: true
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "rtdiff.tlsDir" . }}
  readOnly: true
- name: probe
  mountPath: {{ include "rtdiff.probeDir" . }}
  readOnly: true
{{- if .Values.tls.mutual }}
- name: client-ca
  mountPath: {{ include "rtdiff.clientCADir" . }}
  readOnly: true
{{- if .Values.tls.probeClientSecretName }}
- name: probe-client
  mountPath: {{ include "rtdiff.probeClientDir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: {{ include "rtdiff.authDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "rtdiff.containerPorts" -}}
- name: grpc
  containerPort: {{ int .Values.ports.grpc }}
  protocol: TCP
- name: metrics
  containerPort: {{ int .Values.ports.metrics }}
  protocol: TCP
{{- end -}}

{{/* Pod-level settings shared by every rtdiff pod. */}}
{{- define "rtdiff.podSpecCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Resources with the GPU count added under gpuResource. */}}
{{- define "rtdiff.gpuResources" -}}
{{- $res := deepCopy (default dict .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := merge (dict .gpuResource (int .gpus)) (default dict $res.limits) -}}
{{- $requests := merge (dict .gpuResource (int .gpus)) (default dict $res.requests) -}}
{{- $_ := set $res "limits" $limits -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}
