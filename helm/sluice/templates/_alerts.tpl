{{/*
The alert rules, as the groups of a Prometheus rule file: rendered into the
PrometheusRule (templates/prometheusrule.yaml) and, by helm/render-k8s.sh,
into the plain file deploy/prometheus/alerts.yaml. docs/operations.md has a
runbook paragraph for each alert; deploy/prometheus/alerts.test.yaml tests
each with promtool.
*/}}
{{- define "sluice.alertGroups" -}}
{{- $p := .Values.prometheusRule }}
{{- $fullname := include "sluice.fullname" . }}
{{- $sel := printf "namespace=%q, job=%q" .Release.Namespace $fullname }}
{{- $runbook := $p.runbookUrl | default "docs/operations.md" }}
groups:
  - name: sluice
    rules:
      - alert: SluiceStoreUnavailable
        # The circuit breaker is open: Redis cannot be reached (or does not
        # answer within the store timeout), and every decision is answered
        # by the failure mode.
        expr: |
          max by (namespace, job, instance, store) (sluice_store_breaker_open{ {{- $sel -}} }) > 0
        for: 30s
        labels:
          severity: critical
        annotations:
          summary: "sluice cannot reach its counter store ({{`{{ $labels.store }}`}}) on {{`{{ $labels.instance }}`}}"
          description: "The circuit breaker of {{`{{ $labels.instance }}`}} has been open for 30 s: decisions are answered by the failure mode, so limits are not enforced (allow) or requests are refused (deny)."
          runbook_url: {{ $runbook }}#sluicestoreunavailable
      - alert: SluiceFailureModeAnswers
        # More than failureModeRatio of the answers came from the failure
        # mode, not from the counters.
        expr: |
          sum by (namespace, job) (rate(sluice_failure_mode_answers_total{ {{- $sel -}} }[5m]))
            / sum by (namespace, job) (rate(sluice_request_duration_seconds_count{ {{- $sel -}} }[5m]))
            > {{ $p.failureModeRatio }}
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: "sluice's answers come from the failure mode ({{`{{ $labels.job }}`}})"
          description: "For 5 minutes more than {{ mulf $p.failureModeRatio 100 }} % of the rate-limit answers of {{`{{ $labels.job }}`}} were not decided by the counters (store errors, timeouts, an open breaker)."
          runbook_url: {{ $runbook }}#sluicefailuremodeanswers
      - alert: SluiceDecisionLatencyHigh
        expr: |
          histogram_quantile(0.99, sum by (namespace, job, le) (rate(sluice_request_duration_seconds_bucket{ {{- $sel -}} }[5m])))
            > {{ $p.latencyP99Seconds }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: "sluice's p99 decision latency is above {{ $p.latencyP99Seconds }} s ({{`{{ $labels.job }}`}})"
          description: "For 10 minutes the 99th percentile of a decision (gRPC and /json) took more than {{ $p.latencyP99Seconds }} s: every gateway request waits for it."
          runbook_url: {{ $runbook }}#sluicedecisionlatencyhigh
      - alert: SluiceRuleReloadsFailing
        expr: |
          sum by (namespace, job, instance) (increase(sluice_rule_reloads_total{ {{- $sel -}}, result="failure"}[15m])) > 0
        labels:
          severity: warning
        annotations:
          summary: "sluice refused new rules on {{`{{ $labels.instance }}`}}"
          description: "A rules reload failed in the last 15 minutes: the rules in force are the ones before the change. /readyz says why."
          runbook_url: {{ $runbook }}#sluicerulereloadsfailing
      - alert: SluicePostgresRulesStale
        # Not confirmed current against PostgreSQL for rulesStaleSeconds
        # (sluice re-reads at least every 60 s), or PostgreSQL down since
        # start-up (serving a snapshot, or no rules).
        expr: |
          (time() - max by (namespace, job, instance) (sluice_postgres_rules_synced_timestamp_seconds{ {{- $sel -}} }) > {{ int $p.rulesStaleSeconds }})
          or
          (max by (namespace, job, instance) (sluice_postgres_up{ {{- $sel -}} }) == 0
            unless max by (namespace, job, instance) (sluice_postgres_rules_synced_timestamp_seconds{ {{- $sel -}} }))
        for: 1m
        labels:
          severity: warning
        annotations:
          summary: "sluice on {{`{{ $labels.instance }}`}} serves rules it cannot refresh from PostgreSQL"
          description: "Changes made in PostgreSQL (rules, plans, keys, revocations) do not reach this instance."
          runbook_url: {{ $runbook }}#sluicepostgresrulesstale
      - alert: SluiceUsageRecordsDropped
        expr: |
          sum by (namespace, job, instance, reason) (increase(sluice_usage_dropped_total{ {{- $sel -}} }[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: "sluice dropped usage records on {{`{{ $labels.instance }}`}} ({{`{{ $labels.reason }}`}})"
          description: "Decisions were not counted in PostgreSQL's usage tables in the last 10 minutes: usage reports and monthly quotas undercount."
          runbook_url: {{ $runbook }}#sluiceusagerecordsdropped
      - alert: SluiceOverLimitSurge
        # OVER_LIMIT answers per domain at overLimitRiseFactor times the
        # rate of the hour before (and at least overLimitMinRate per second).
        expr: |
          sum by (namespace, job, domain) (rate(sluice_decisions_total{ {{- $sel -}}, code="OVER_LIMIT"}[5m])) > {{ $p.overLimitMinRate }}
          and
          sum by (namespace, job, domain) (rate(sluice_decisions_total{ {{- $sel -}}, code="OVER_LIMIT"}[5m]))
            > {{ $p.overLimitRiseFactor }} * (
              sum by (namespace, job, domain) (rate(sluice_decisions_total{ {{- $sel -}}, code="OVER_LIMIT"}[1h] offset 5m))
              or
              0 * sum by (namespace, job, domain) (rate(sluice_decisions_total{ {{- $sel -}}, code="OVER_LIMIT"}[5m]))
            )
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: "OVER_LIMIT answers in domain {{`{{ $labels.domain }}`}} rose suddenly"
          description: "sluice denies requests of domain {{`{{ $labels.domain }}`}} at {{ $p.overLimitRiseFactor }} times the rate of the hour before: a client misbehaving, an attack, or a limit set too low."
          runbook_url: {{ $runbook }}#sluiceoverlimitsurge
      - alert: SluicePodsNotReady
        # kube-state-metrics' pod readiness (sluice's pods and the chart's
        # Redis), or Prometheus cannot scrape a sluice pod at all.
        expr: |
          sum by (namespace, pod) (kube_pod_status_ready{namespace={{ .Release.Namespace | quote }}, pod=~{{ printf "%s-.*" $fullname | quote }}, condition="true"}) == 0
          or
          up{ {{- $sel -}} } == 0
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: "sluice pod {{`{{ $labels.pod }}{{ $labels.instance }}`}} not ready"
          description: "For 5 minutes the pod has not been ready, or its /metrics could not be scraped: it takes no traffic, the others take its share."
          runbook_url: {{ $runbook }}#sluicepodsnotready
{{- end }}
