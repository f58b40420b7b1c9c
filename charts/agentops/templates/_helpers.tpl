{{/* The release's full name, at most 63 characters (a DNS label). */}}
{{- define "agentops.fullname" -}}
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

{{- define "agentops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentops.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "agentops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The selector of the controller's pods. */}}
{{- define "agentops.controllerSelector" -}}
app.kubernetes.io/name: {{ include "agentops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "agentops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "agentops.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: give the existing account to run as when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "agentops.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The API's address inside the cluster, as agents reach it. */}}
{{- define "agentops.apiUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "agentops.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}

{{/*
The command and arguments of one agent's container, given (dict "root" $ "agent" $agent).
The one place that says how an agent is started.
*/}}
{{- define "agentops.agentCommand" -}}
{{- $agent := .agent -}}
{{- $builtIn := has $agent.type (list "seed" "cos") -}}
command:
  - agentops
args:
  - agent
  {{- /* A seed or cos is the role itself; any other agent runs its Agent spec. */}}
  - {{ ternary $agent.type ($agent.spec | default $agent.name) $builtIn }}
  - --api={{ include "agentops.apiUrl" .root }}
  {{- if $builtIn }}
  - --concurrency={{ $agent.concurrency | default 4 }}
  {{- with $agent.capabilities }}
  - --capabilities={{ join "," . }}
  {{- end }}
  {{- end }}
{{- end -}}

{{/* The ServiceAccount agents run as when they enroll with its token. */}}
{{- define "agentops.agentServiceAccountName" -}}
{{- printf "%s-agents" (include "agentops.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* An env entry from a key of an existing Secret, given (list NAME SECRET-VALUES). */}}
{{- define "agentops.secretEnv" -}}
{{- $name := index . 0 -}}
{{- $secret := index . 1 -}}
{{- if $secret.existingSecret }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret.existingSecret }}
      key: {{ $secret.key }}
{{- end }}
{{- end -}}

{{/* NATS, which the controller and the agents share. */}}
{{- define "agentops.busEnv" -}}
{{- with .Values.nats.url }}
- name: AGENTOPS_NATS
  value: {{ . | quote }}
{{- end }}
- name: AGENTOPS_BUS_PREFIX
  value: {{ .Values.nats.busPrefix | quote }}
{{- end -}}

{{/* The controller's environment: every setting of `agentops up` the chart makes. */}}
{{- define "agentops.controllerEnv" -}}
- name: AGENTOPS_LISTEN
  value: "0.0.0.0:7700"
- name: AGENTOPS_DATA_DIR
  value: /var/lib/agentops
{{- with .Values.watchNamespace }}
- name: AGENTOPS_NAMESPACE
  value: {{ . | quote }}
{{- end }}
- name: AGENTOPS_LEADER_LOCK
  value: {{ .Values.controller.leaderLock | quote }}
- name: AGENTOPS_LEADER_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: AGENTOPS_LEADER_IDENTITY
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if not .Values.controller.embeddedAgents }}
- name: AGENTOPS_NO_AGENTS
  value: "true"
{{- end }}
{{- if .Values.database.url }}
- name: AGENTOPS_DATABASE_URL
  value: {{ .Values.database.url | quote }}
{{- end }}
{{- include "agentops.secretEnv" (list "AGENTOPS_DATABASE_URL" .Values.database) }}
{{- include "agentops.busEnv" . }}
{{- with .Values.redis.url }}
- name: AGENTOPS_REDIS
  value: {{ . | quote }}
{{- end }}
{{- with .Values.git.repo }}
- name: AGENTOPS_REPO
  value: {{ . | quote }}
{{- end }}
{{- with .Values.git.branch }}
- name: AGENTOPS_BRANCH
  value: {{ . | quote }}
{{- end }}
{{- with .Values.git.path }}
- name: AGENTOPS_PATH
  value: {{ . | quote }}
{{- end }}
{{- include "agentops.secretEnv" (list "AGENTOPS_GIT_TOKEN" .Values.secrets.gitToken) }}
{{- include "agentops.secretEnv" (list "AGENTOPS_GITHUB_TOKEN" .Values.secrets.githubToken) }}
{{- include "agentops.secretEnv" (list "AGENTOPS_WEBHOOK_SECRET" .Values.secrets.webhookSecret) }}
{{- include "agentops.secretEnv" (list "OPENROUTER_API_KEY" .Values.secrets.openrouterApiKey) }}
{{- include "agentops.secretEnv" (list "AGENTOPS_AGENT_SECRET" .Values.secrets.agentSecret) }}
{{- if eq .Values.agentEnrollment "serviceAccount" }}
- name: AGENTOPS_AGENT_SERVICE_ACCOUNTS
  value: {{ printf "%s:%s" .Release.Namespace (include "agentops.agentServiceAccountName" .) | quote }}
{{- end }}
{{- range $name, $value := .Values.controller.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* An agent's environment. */}}
{{- define "agentops.agentEnv" -}}
# Each replica registers under its own pod's name.
- name: AGENTOPS_AGENT_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- include "agentops.busEnv" . }}
{{- if eq .Values.agentEnrollment "serviceAccount" }}
# The pod's own ServiceAccount token, which the controller checks by a TokenReview.
- name: AGENTOPS_AGENT_SECRET_FILE
  value: /var/run/secrets/kubernetes.io/serviceaccount/token
{{- else }}
{{- include "agentops.secretEnv" (list "AGENTOPS_AGENT_SECRET" .Values.secrets.agentSecret) }}
{{- end }}
{{- end -}}
